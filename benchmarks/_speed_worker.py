"""One measurement of the speed benchmark, in a process of its own (bench_speed.py starts it).

    python benchmarks/_speed_worker.py '<json job>' <result.json>

A process per measurement keeps methods from sharing allocator state, compiled kernels or page
caches, and lets peak memory be measured per method on CPU. The environment (torch.compile on or
off, thread count) is set by bench_speed.py before this process imports torch.
"""
from __future__ import annotations

import json
import logging
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")  # gptqmodel fails to size its pool on 2-core machines
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
warnings.filterwarnings("ignore")

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


# ---- memory ---------------------------------------------------------------------------------------
# CPU: resident set size from /proc. Writing "5" to /proc/self/clear_refs resets the peak (VmHWM) to
# the current RSS (Linux >= 4.0), so the peak of a phase can be read after it, with no sampling.

def _status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def rss_mib() -> float | None:
    kib = _status_kib("VmRSS")
    return None if kib is None else kib / 1024


def reset_peak_rss() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss_mib() -> float | None:
    kib = _status_kib("VmHWM")
    return None if kib is None else kib / 1024


# ---- helpers ---------------------------------------------------------------------------------------

def quiet() -> None:
    for name in ("transformers", "peft", "optimum", "gptqmodel", "torch._dynamo", "torch._inductor", "peft_lota"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        from logbar import LogBar  # gptqmodel's logger: banner, kernel choice

        LogBar.shared().setLevel(logging.ERROR)
    except ImportError:
        pass


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def summary(times: list[float]) -> dict:
    q = statistics.quantiles(times, n=4) if len(times) >= 2 else [times[0]] * 3
    return dict(median=statistics.median(times), min=min(times), max=max(times), q1=q[0], q3=q[2], n=len(times),
                all=[round(t, 6) for t in times])


def load_model(path: str, job: dict, backend: str | None):
    """A stock transformers load: backend None is the default kernel (what users get), "trainable" the format's
    layout-keeping, trainable kernel (what peft_lota.load_model picks: gptq_torch, torch_awq)."""
    import torch
    from transformers import AutoModelForCausalLM

    from peft_lota.formats import config_format

    kwargs = dict(device_map=job["device"])
    if backend is not None:
        qc = json.loads((Path(path) / "config.json").read_text())["quantization_config"]
        config = config_format(qc).load_config(qc)
        if config is not None:  # None: the format has no kernel choice (compressed-tensors)
            if backend != "trainable":
                config.backend = backend
            kwargs["quantization_config"] = config
    if job.get("dtype"):
        kwargs["dtype"] = getattr(torch, job["dtype"])
    return AutoModelForCausalLM.from_pretrained(path, **kwargs)


def kernel_name(model) -> str:
    from gptqmodel.nn_modules.qlinear import BaseQuantLinear

    from peft_lota.formats import compressed_tensors

    if compressed_tensors.model_is_ct(model):
        return "nn.Linear (compressed-tensors, decompressed by transformers)"
    if any(type(m).__name__ == "Linear8bitLt" for m in model.modules()):
        return "bitsandbytes Linear8bitLt (int8 matmul)"
    return next((type(m).__name__ for m in model.modules() if isinstance(m, BaseQuantLinear)), "?")


def randomize_lota(model, seed: int, dense: bool) -> None:
    """Random ternary A, B: uniform over {-1, 0, 1}, or dense (+-1 only: every code may move)."""
    import torch
    from peft_lota import LotaLayer

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in (m for m in model.modules() if isinstance(m, LotaLayer)):
            for p in (layer.lota_A["default"], layer.lota_B["default"]):
                if dense:
                    p.copy_(torch.randint(0, 2, p.shape, generator=g) * 2 - 1)
                else:
                    p.copy_(torch.randint(-1, 2, p.shape, generator=g))


def attach(model, method: str, job: dict):
    """The adapter model and its optimizer, as a user of each method would set them up (the trainer's AdamW,
    except for the paper's LoTA: t-SignSGD)."""
    import torch
    from peft import LoraConfig, get_peft_model

    import peft_lota

    r = job["rank"]
    if method.startswith("lota"):
        mode = {"train_mode": "ternary"} if method == "lota-paper" else {}
        model = get_peft_model(model, peft_lota.LotaConfig(r=r, target_modules=LORA_TARGETS, init_seed=0, **mode))
        if method == "lota-dense":
            randomize_lota(model, seed=0, dense=True)
        if method == "lota-paper":
            return model, peft_lota.create_lota_optimizer(model, total_steps=job["warmup"] + job["steps"])
    elif method == "l4q":
        model = get_peft_model(model, peft_lota.L4QConfig(r=r, lora_alpha=2 * r, target_modules=LORA_TARGETS,
                                                          init_seed=0))
    else:
        config = LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules=LORA_TARGETS,
                            use_qalora=method == "qalora", qalora_group_size=job["group_size"])
        model = get_peft_model(model, config)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    return model, opt


# ---- jobs ------------------------------------------------------------------------------------------

def run_train(job: dict) -> dict:
    """Time per optimizer step (forward, backward, optimizer step) and peak memory of one method."""
    import torch

    device = torch.device(job["device"])
    rss_start = rss_mib()  # after imports: the runtime, not the model
    model = load_model(job["model_dir"], job, backend="trainable")  # the trainable kernel, for every method
    model, opt = attach(model, job["method"], job)
    model.train()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (job["batch"], job["seq"]), generator=g).to(device)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)

    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        mem_loaded = torch.cuda.memory_allocated() / 2**20
    else:
        mem_loaded = rss_mib()
        peak_resettable = reset_peak_rss()
    times = []
    for i in range(job["warmup"] + job["steps"]):
        sync(device)
        t0 = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync(device)
        if i >= job["warmup"]:
            times.append(time.perf_counter() - t0)
    if device.type == "cuda":
        peak, base, how = torch.cuda.max_memory_allocated() / 2**20, 0.0, "torch.cuda.max_memory_allocated"
    else:
        peak, base = peak_rss_mib(), rss_start
        how = "VmHWM - VmRSS after imports" if peak_resettable else "ru_maxrss (peak not resettable)"
    return dict(step_s=summary(times), peak_mib=peak - base, loaded_mib=mem_loaded - base,
                growth_mib=peak - mem_loaded, memory_method=how, trainable_params=trainable,
                loss=float(loss), kernel=kernel_name(model))


def make_merged_checkpoint(job: dict) -> dict:
    """LoTA with random dense ternary A, B on the base, merged and saved in the base's format.

    omega is set low (r / 8) so that many codes really move: with omega = 0.75 r, random A, B move none.
    """
    from peft import get_peft_model

    import peft_lota

    model = load_model(job["model_dir"], job, backend="trainable")
    model = get_peft_model(model, peft_lota.LotaConfig(r=job["rank"], omega=job["omega"], target_modules=LORA_TARGETS,
                                                       init_seed=0))
    randomize_lota(model, seed=1, dense=True)
    moved = sum(int(layer.get_delta_codes("default").ne(0).sum())
                for layer in model.modules() if isinstance(layer, peft_lota.LotaLayer))
    merged = model.merge_and_unload()
    merged.save_pretrained(job["out_dir"])
    from peft_lota.formats import is_quantized_layer

    total = sum(layer.in_features * layer.out_features for layer in merged.modules() if is_quantized_layer(layer))
    return dict(codes_moved=moved, codes_total=total)


def run_infer(job: dict) -> dict:
    """Prefill throughput and one-token decode latency (KV cache) under the default kernel of a stock load.

    The three models (base, merged LoTA, unmerged LoRA on the base) live in this one process and are
    measured in turn, call by call, so that a change of machine load hits all three alike.
    """
    import torch
    from peft import LoraConfig, get_peft_model

    device = torch.device(job["device"])
    models = {"base": load_model(job["base_dir"], job, backend=None),
              "merged": load_model(job["merged_dir"], job, backend=None)}
    if "lora" in job.get("models", ("lora",)):
        lora = LoraConfig(r=job["rank"], lora_alpha=2 * job["rank"], target_modules=LORA_TARGETS,
                          init_lora_weights=False)
        models["lora"] = get_peft_model(load_model(job["base_dir"], job, backend=None), lora)  # LoRA B random, not 0
    for model in models.values():
        model.eval()
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, models["base"].config.vocab_size, (1, job["prompt"]), generator=g).to(device)

    def timed(fn):
        sync(device)
        t0 = time.perf_counter()
        out = fn()
        sync(device)
        return out, time.perf_counter() - t0

    prefill_t = {name: [] for name in models}
    decode_t = {name: [] for name in models}
    state = {}
    with torch.inference_mode():
        for name, model in models.items():  # the default CPU kernels repack their weights on the first call
            for _ in range(job["warmup"]):
                out = model(input_ids=prompt, use_cache=True)
                model(input_ids=out.logits[:, -1:].argmax(-1), past_key_values=out.past_key_values, use_cache=True)
        names = list(models)
        turns = lambda i: names[i % len(names):] + names[:i % len(names)]  # noqa: E731  (no model always first)
        for i in range(job["repeats"]):
            for name in turns(i):
                model = models[name]
                out, t = timed(lambda: model(input_ids=prompt, use_cache=True))
                prefill_t[name].append(t)
                state[name] = (out.past_key_values, out.logits[:, -1:].argmax(-1))
        for i in range(job["decode_steps"]):
            for name in turns(i):
                model = models[name]
                cache, token = state[name]
                out, t = timed(lambda: model(input_ids=token, past_key_values=cache, use_cache=True))
                decode_t[name].append(t)
                state[name] = (out.past_key_values, out.logits[:, -1:].argmax(-1))
    results = {}
    for name, model in models.items():
        prefill_s = summary(prefill_t[name])
        results[name] = dict(prefill_s=prefill_s, prefill_tok_s=job["prompt"] / prefill_s["median"],
                             decode_s=summary(decode_t[name]), kernel=kernel_name(model))
    return results


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def run_merge(job: dict) -> dict:
    """merge_and_unload() of a LoTA adapter with random ternary A, B; the merged save; adapter file sizes."""
    import shutil

    import torch
    from peft import LoraConfig, get_peft_model

    import peft_lota

    rss_start = rss_mib()
    t0 = time.perf_counter()
    model = load_model(job["model_dir"], job, backend="trainable")
    load_s = time.perf_counter() - t0
    if job.get("method") == "l4q":  # L4Q from the GPTQ model, a trained-looking LoRA: W0 + BA re-quantized
        model = get_peft_model(model, peft_lota.L4QConfig(r=job["rank"], lora_alpha=job["rank"],
                                                          target_modules=LORA_TARGETS, init_seed=0))
        g = torch.Generator().manual_seed(3)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("l4q_B.default"):
                    p.copy_(torch.randn(p.shape, generator=g) * 1e-3)
        sync(torch.device(job["device"]))
        t0 = time.perf_counter()
        model.merge_and_unload()
        sync(torch.device(job["device"]))
        return dict(merge_s=time.perf_counter() - t0)
    model = get_peft_model(model, peft_lota.LotaConfig(r=job["rank"], target_modules=LORA_TARGETS, init_seed=0))
    randomize_lota(model, seed=2, dense=job["dense"])
    if job["dense"]:  # the worst case, +-1 everywhere (no row or column can be skipped): the merge time only
        sync(torch.device(job["device"]))
        t0 = time.perf_counter()
        model.merge_and_unload()
        sync(torch.device(job["device"]))
        return dict(merge_s=time.perf_counter() - t0)
    work = Path(job["work_dir"])
    shutil.rmtree(work, ignore_errors=True)
    model.save_pretrained(str(work / "lota-adapter"))
    lota_bytes = (work / "lota-adapter" / "adapter_model.safetensors").stat().st_size
    model.peft_config["default"].save_latents = False  # the file one ships: ternary values only
    model.save_pretrained(str(work / "lota-ship"))
    ship_bytes = (work / "lota-ship" / "adapter_model.safetensors").stat().st_size
    layers = sum(1 for m in model.modules() if isinstance(m, peft_lota.LotaLayer))
    codes = sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, peft_lota.LotaLayer))

    reset_peak_rss()
    rss_before = rss_mib()
    sync(torch.device(job["device"]))
    t0 = time.perf_counter()
    merged = model.merge_and_unload()
    sync(torch.device(job["device"]))
    merge_s = time.perf_counter() - t0
    merge_peak = peak_rss_mib()
    result = dict(merge_s=merge_s, ns_per_code=merge_s / codes * 1e9, codes=codes, layers=layers, load_s=load_s,
                  lota_adapter_bytes=lota_bytes, lota_ship_adapter_bytes=ship_bytes,
                  rss_before_merge_mib=rss_before - rss_start,
                  merge_peak_rss_mib=merge_peak - rss_start, kernel=kernel_name(merged))
    if job["save"]:
        t0 = time.perf_counter()
        merged.save_pretrained(str(work / "merged"))
        result["save_s"] = time.perf_counter() - t0
        result["merged_checkpoint_bytes"] = _dir_bytes(work / "merged")
        shutil.rmtree(work / "merged", ignore_errors=True)
    if not job.get("sizes", True):
        shutil.rmtree(work, ignore_errors=True)
        return result
    # The fp16 LoRA adapter of the same rank on the same layers, saved by PEFT, for the size comparison.
    lora = get_peft_model(merged, LoraConfig(r=job["rank"], lora_alpha=2 * job["rank"], target_modules=LORA_TARGETS))
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if "lora_" in name:
                p.data = p.data.half()
    lora.save_pretrained(str(work / "lora-adapter"))
    result["lora_fp16_adapter_bytes"] = (work / "lora-adapter" / "adapter_model.safetensors").stat().st_size
    shutil.rmtree(work, ignore_errors=True)
    return result


def run_merge_lora_layer(job: dict) -> dict:
    """One layer of merge_lora on random data of a real layer shape: the Hessian's cost per 1k calibration tokens,
    the rounding with error feedback (and with the scales refit), and the peak memory of doing it (one layer at a
    time is all merge_lora holds beyond the model and the calibration activations)."""
    import torch

    from peft_lota.feedback import add_to_hessian, merge_onto_grid

    K, N, gs, bits = job["in_features"], job["out_features"], job["group_size"], job["bits"]
    g = torch.Generator().manual_seed(0)
    maxq, G = (1 << bits) - 1, K // gs
    rss_start = rss_mib()
    codes = torch.randint(0, maxq + 1, (K, N), generator=g, dtype=torch.uint8)
    zeros = torch.full((G, N), (maxq + 1) // 2, dtype=torch.int32)
    scales = (torch.rand(G, N, generator=g) * 0.01 + 0.005).half()
    g_idx = torch.arange(K) // gs
    x = torch.randn(1024, K, generator=g)
    H = torch.zeros(K, K)
    t0 = time.perf_counter()
    add_to_hessian(H, x)
    hessian_s = time.perf_counter() - t0
    H += torch.eye(K) * 1e-2 * float(H.diagonal().mean())
    base = scales.float()[g_idx] * (codes.float() - zeros.float()[g_idx])
    target = base + 1e-3 * torch.randn(K, 64, generator=g) @ torch.randn(64, N, generator=g)
    del x
    out = dict(in_features=K, out_features=N, hessian_s_per_1k_tokens=hessian_s)
    for key, scales_on in (("round", False), ("round_scales", True)):
        reset_peak_rss()
        t0 = time.perf_counter()
        merge_onto_grid(target, codes, zeros, scales, g_idx, maxq, H, train_scales=scales_on)
        out[f"{key}_s"] = time.perf_counter() - t0
        out[f"{key}_peak_mib"] = peak_rss_mib() - rss_start
    return out


def run_merge_lora(job: dict) -> dict:
    """merge_lora end to end on a random GPTQ checkpoint: a random r-`rank` LoRA on every projection, random token
    calibration; time and peak memory (the model included)."""
    import torch
    from peft import LoraConfig, get_peft_model

    import peft_lota

    rss_start = rss_mib()
    model = load_model(job["model_dir"], job, backend="trainable")
    model = get_peft_model(model, LoraConfig(r=job["rank"], lora_alpha=job["rank"], target_modules=LORA_TARGETS,
                                             init_lora_weights=False))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 1e-3)
    vocab = model.config.vocab_size
    calib = [torch.randint(0, vocab, (job["calib_batch"], job["calib_seq"]), generator=g)
             for _ in range(job["calib_batches"])]
    rss_loaded = rss_mib()
    reset_peak_rss()
    t0 = time.perf_counter()
    merged = peft_lota.merge_lora(model, calib, train_scales=job.get("train_scales", False), progress=False)
    seconds = time.perf_counter() - t0
    r = merged.merge_lora_report
    return dict(merge_s=seconds, layers=len(r.layers), loaded_mib=rss_loaded - rss_start,
                peak_mib=peak_rss_mib() - rss_start, calibration_tokens=r.calibration_tokens + r.eval_tokens,
                per_layer_s=sum(x["seconds"] for x in r.layers.values()) / max(len(r.layers), 1))


def run_stream_prep(job: dict) -> dict:
    """A LoTA adapter with random ternary A, B on the checkpoint, saved (for the two merges below)."""
    from peft import get_peft_model

    import peft_lota

    model = load_model(job["model_dir"], job, backend="trainable")
    model = get_peft_model(model, peft_lota.LotaConfig(r=job["rank"], target_modules=LORA_TARGETS, init_seed=0))
    randomize_lota(model, seed=2, dense=False)
    model.save_pretrained(job["adapter_dir"])
    return {}


def run_merge_in_memory(job: dict) -> dict:
    """What `peft-lota merge` does without --stream: load, apply the adapter, merge_and_unload, save."""
    import shutil

    from peft import PeftModel

    shutil.rmtree(job["out_dir"], ignore_errors=True)
    reset_peak_rss()
    rss_start = rss_mib()
    t0 = time.perf_counter()
    model = PeftModel.from_pretrained(load_model(job["model_dir"], job, backend="trainable"), job["adapter_dir"])
    model.merge_and_unload().save_pretrained(job["out_dir"])
    seconds = time.perf_counter() - t0
    return dict(seconds=seconds, peak_rss_mib=peak_rss_mib(), start_rss_mib=rss_start)


def run_merge_stream(job: dict) -> dict:
    """peft_lota.stream.merge_checkpoint: shard by shard, the model never built."""
    import shutil

    from peft_lota.stream import merge_checkpoint

    shutil.rmtree(job["out_dir"], ignore_errors=True)
    reset_peak_rss()
    rss_start = rss_mib()
    t0 = time.perf_counter()
    report = merge_checkpoint(job["model_dir"], job["adapter_dir"], job["out_dir"], progress=False)
    seconds = time.perf_counter() - t0
    return dict(seconds=seconds, peak_rss_mib=peak_rss_mib(), start_rss_mib=rss_start, layers=report.layers,
                shards=report.shards, per_shard_s=report.per_shard_seconds)


JOBS = {"stream_prep": run_stream_prep, "merge_in_memory": run_merge_in_memory, "merge_stream": run_merge_stream,
        "train": run_train, "infer": run_infer, "merged_checkpoint": make_merged_checkpoint, "merge": run_merge,
        "merge_lora_layer": run_merge_lora_layer, "merge_lora": run_merge_lora}


def main() -> None:
    job, out = json.loads(sys.argv[1]), Path(sys.argv[2])
    quiet()
    import torch

    if job.get("threads"):
        torch.set_num_threads(job["threads"])
    import peft_lota  # noqa: F401  (registers LOTA with PEFT)

    quiet()
    result = JOBS[job["kind"]](job)
    out.write_text(json.dumps(result))


if __name__ == "__main__":
    main()
