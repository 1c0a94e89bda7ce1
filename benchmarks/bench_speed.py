"""Speed and memory benchmark: LoTA-QAF and L4Q against PEFT LoRA and QA-LoRA on the same GPTQ (and AWQ) models.

    python benchmarks/bench_speed.py --preset cpu            # smoke | cpu | real | gpu
    python benchmarks/bench_speed.py --preset cpu --only train merge merge_lora

Four parts, each method measured in a process of its own (benchmarks/_speed_worker.py):

- train: time per optimizer step (forward + backward + optimizer step; warm-up steps excluded;
  median and spread over the timed steps) and peak memory, on a tiny model and on a model with
  TinyLlama-1.1B's layer widths. Methods: LoTA with its defaults under AdamW (from its fresh
  initialisation, and with dense random +-1 A, B: its worst case, no row chunk can be skipped), LoTA as
  the paper trains it (t-SignSGD), L4Q from the GPTQ model (AdamW), PEFT LoRA and PEFT QA-LoRA (AdamW),
  all with the same rank, the same targets and the same trainable kernel (gptqmodel TorchLinear,
  backend "gptq_torch").
- infer: prefill throughput and one-token decode latency (KV cache) under the default kernel of a
  stock `from_pretrained(dir)`: the base GPTQ checkpoint, the merged LoTA checkpoint
  (merge_and_unload + save_pretrained) and PEFT LoRA unmerged on the base.
- merge: merge_and_unload() of an r=64 LoTA adapter with random ternary A, B on a model with
  Llama-3-8B's linear shapes (random GPTQ codes), the same for an L4Q adapter, the save of the merged
  checkpoint, and the size of the LoTA adapter file against an fp16 LoRA adapter of the same rank.
- AWQ, compressed-tensors and LLM.int8: the same merges on the 8B-shaped model in AWQ's GEMM layout, in
  compressed-tensors' pack-quantized one and as bitsandbytes' int8 rows, and inference of the base and the merged
  LoTA checkpoint under each format's default (AWQ: gptqmodel's CPU kernel; compressed-tensors: transformers
  decompresses to dense; LLM.int8: bitsandbytes' int8 matmul).
- merge_lora: a PEFT LoRA merged onto the base's grid, one layer of each distinct shape (Hessian per 1k tokens,
  rounding with error feedback, with the scales refit, peak memory), the whole model estimated from them, and end
  to end on a random checkpoint of the real model's shapes (time and peak memory).

GPTQ checkpoints are random but valid (benchmarks/_speed_models.py): speed does not depend on the
values. Results go to benchmarks/results/speed-<preset>.{md,json}, with the machine they ran on.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")  # gptqmodel fails to size its pool on 2-core machines

from _machine import machine_info  # noqa: E402
from dataclasses import replace  # noqa: E402

from _speed_models import FORMAT_NAMES, ModelShape, write_random_gptq  # noqa: E402

RESULTS = HERE / "results"
WORKER = HERE / "_speed_worker.py"

# Layer shapes of real models (random codes). tiny: the test suite's tiny Llama. mid: TinyLlama-1.1B's
# widths, with few layers and a small vocabulary on CPU so that the decoder layers, not the output
# head, dominate as they do in the full-depth model. 8B: Llama-3-8B's linear layers; a tiny vocabulary
# (embeddings are not part of a merge). The CPU checkpoints are bf16: gptqmodel's default CPU kernel
# (TorchAtenLinear, aten's int4pack matmul) is fast with bf16 activations only; with fp16 it takes a
# path ~40x slower, with fp32 it dequantizes at every call. Training loads them in the preset's dtype.
TINY = ModelShape("tiny", hidden=128, intermediate=384, layers=2, heads=4, kv_heads=2, vocab=512, group_size=32,
                  dtype="bfloat16")
MID_CPU = ModelShape("mid (TinyLlama-1.1B widths, 2 of 22 layers)", hidden=2048, intermediate=5632, layers=2,
                     heads=32, kv_heads=4, vocab=1024, dtype="bfloat16")
MID_GPU = ModelShape("mid (TinyLlama-1.1B shapes, all 22 layers)", hidden=2048, intermediate=5632, layers=22,
                     heads=32, kv_heads=4, vocab=32000, dtype="float16")
# SmolLM2-135M-Instruct's shapes (the real model of the demo and of bench_accuracy's real preset), all 30 layers and
# its 49k vocabulary, group 64 as its GPTQ variants (576 is not a multiple of 128).
SMOLLM2 = ModelShape("SmolLM2-135M shapes (all 30 layers)", hidden=576, intermediate=1536, layers=30, heads=9,
                     kv_heads=3, vocab=49152, group_size=64, dtype="bfloat16")
LLAMA3_8B = ModelShape("Llama-3-8B linear shapes", hidden=4096, intermediate=14336, layers=32, heads=32, kv_heads=8,
                       vocab=256, dtype="float16")
# Llama-3-70B's linear shapes, as many layers as the stream part writes (80 in the model: the rest extrapolated).
LLAMA3_70B_4 = ModelShape("Llama-3-70B linear shapes, 4 of 80 layers", hidden=8192, intermediate=28672, layers=4,
                          heads=64, kv_heads=8, vocab=256, dtype="float16")

# The smoke's merge and stream shape: every code path of those parts, in seconds (quarter-width Llama-3-8B layers).
SMOKE_MERGE = ModelShape("Llama-3-8B linear shapes at a quarter of their widths, 2 layers", hidden=1024,
                         intermediate=3584, layers=2, heads=8, kv_heads=2, vocab=256, dtype="float16")

PRESETS: dict[str, dict] = {
    # CI: minutes on 2 cores; checks that every part runs, its numbers are not meant to be read.
    "smoke": dict(device="cpu", dtype="float32", compile="off", rank=16,
                  train=[dict(shape=TINY, batch=2, seq=64, warmup=1, steps=3)],
                  infer=dict(shape=TINY, prompt=32, warmup=1, repeats=3, decode_steps=5),
                  merge=dict(shape=SMOKE_MERGE, save=True),
                  merge_lora=dict(layers=TINY, model=TINY, calib=(4, 2, 32)),
                  stream=dict(shapes=[SMOKE_MERGE], in_memory=True)),
    # 2 CPU cores, ~8-12 min (most of it the 8B-shaped merge part): the numbers the README quotes.
    "cpu": dict(device="cpu", dtype="float32", compile="off", rank=64,
                train=[dict(shape=TINY, batch=8, seq=128, warmup=3, steps=20),
                       dict(shape=MID_CPU, batch=1, seq=256, warmup=2, steps=8, ranks=(64, 16))],
                infer=dict(shape=MID_CPU, prompt=128, warmup=2, repeats=20, decode_steps=32),
                merge=dict(shape=LLAMA3_8B, save=True, dense=True),
                merge_lora=dict(layers=LLAMA3_8B, model=None, calib=(128, 1, 512)),
                stream=dict(shapes=[LLAMA3_8B], in_memory=True, extrapolate=[(LLAMA3_70B_4, 80)])),
    # 2 CPU cores, ~15 min: the real model's shapes (bench_accuracy --preset real's step: 4 x 128 tokens).
    "real": dict(device="cpu", dtype="float32", compile="off", rank=64,
                 train=[dict(shape=SMOLLM2, batch=4, seq=128, warmup=2, steps=6, ranks=(64, 16))],
                 infer=dict(shape=SMOLLM2, prompt=128, warmup=2, repeats=10, decode_steps=32),
                 merge=dict(shape=SMOLLM2, save=True, dense=True),
                 merge_lora=dict(layers=SMOLLM2, model=SMOLLM2, calib=(30, 4, 128)),
                 stream=dict(shapes=[SMOLLM2], in_memory=True)),
    # One CUDA GPU (UNTESTED: no GPU was available when this was written).
    "gpu": dict(device="cuda", dtype="bfloat16", compile="on", rank=64,
                train=[dict(shape=TINY, batch=8, seq=128, warmup=5, steps=30),
                       dict(shape=MID_GPU, batch=8, seq=512, warmup=5, steps=20)],
                infer=dict(shape=MID_GPU, prompt=512, warmup=3, repeats=20, decode_steps=64),
                merge=dict(shape=LLAMA3_8B, save=True, dense=True),
                merge_lora=dict(layers=LLAMA3_8B, model=None, calib=(128, 1, 512)),
                stream=dict(shapes=[LLAMA3_8B], in_memory=True)),
}

TRAIN_METHODS = {
    "lota": "LoTA, defaults (latent, AdamW; fresh init)",
    "lota-dense": "LoTA, defaults (dense random A, B)",
    "lota-paper": "LoTA, paper's t-SignSGD (fresh init)",
    "l4q": "L4Q from the GPTQ model",
    "lora": "LoRA",
    "qalora": "QA-LoRA",
}
INFER_MODELS = {"base": "base", "merged": "LoTA merged", "lora": "LoRA unmerged"}

# Targets of issue 4, with the paper's figures (LoTA-QAF, arXiv 2505.18724) for reference.
TARGETS = {
    "train_time": ("training step time <= 1.10x LoRA", 1.10, "1.14-1.25x"),
    "train_mem": ("peak training memory <= LoRA's", 1.00, "+3-6%"),
    "l4q_time": ("L4Q training step time <= 1.3x LoRA", 1.30, "-"),
    "l4q_mem": ("L4Q peak training memory <= 1.1x LoRA", 1.10, "(L4Q, 16-bit W0: 1.01x LoRA)"),
    "infer_base": ("merged inference within 1% of the base model", 0.01, "-"),
    "infer_lora": ("merged inference >= 1.7x faster than unmerged LoRA", 1.70, "1.7-2.0x"),
    "merge": ("merge of an 8B-shaped model < 60 s", 60.0, "-"),
    "stream_rss": ("streaming merge: peak RSS <= 1/4 of the checkpoint", 0.25, "-"),
    "stream_time": ("streaming merge: time <= the in-memory merge's (load, merge, save)", 1.0, "-"),
}
FORMATS = ("gptq", "awq", "ct", "int8")


# ---- running workers --------------------------------------------------------------------------------

def run_worker(job: dict, env: dict, log) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        out = Path(f.name)
    t0 = time.time()
    proc = subprocess.run([sys.executable, str(WORKER), json.dumps(job), str(out)], env=env,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        out.unlink(missing_ok=True)
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-25:])
        raise RuntimeError(f"worker {job['kind']} {job.get('method', '')} failed:\n{tail}")
    result = json.loads(out.read_text())
    out.unlink()
    log(f"  {job['kind']} {job.get('method', '')}: done in {time.time() - t0:.0f} s")
    return result


def worker_env(cfg: dict, threads: int | None) -> dict:
    env = dict(os.environ)
    # gptqmodel's TorchLinear torch.compiles its dequantization unless dynamo is disabled. One setting
    # for every method and every process of a run (LoTA's own forward is eager either way).
    env["TORCHDYNAMO_DISABLE"] = "1" if cfg["compile"] == "off" else "0"
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    env.setdefault("PYTHONPATH", "")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(HERE.parent), env["PYTHONPATH"]) if p)
    return env


# ---- the three parts ----------------------------------------------------------------------------------

def bench_train(cfg: dict, work: Path, env: dict, log) -> list[dict]:
    rows = []
    for spec in cfg["train"]:
        shape = spec["shape"]
        path = write_random_gptq(shape, work / slug(shape))
        for rank in spec.get("ranks", (cfg["rank"],)):
            log(f"train: {shape.describe()}, batch {spec['batch']} x {spec['seq']} tokens, r = {rank}")
            for method in TRAIN_METHODS:
                job = dict(kind="train", method=method, model_dir=str(path), device=cfg["device"],
                           dtype=cfg["dtype"], rank=rank, group_size=shape.group_size, batch=spec["batch"],
                           seq=spec["seq"], warmup=spec["warmup"], steps=spec["steps"], threads=cfg.get("threads"))
                rows.append(dict(model=shape.name, describe=shape.describe(), method=method, rank=rank,
                                 tokens=spec["batch"] * spec["seq"], **run_worker(job, env, log)))
    return rows


def bench_infer(cfg: dict, work: Path, env: dict, log) -> list[dict]:
    spec = cfg["infer"]
    rows = []
    for fmt in FORMATS:
        shape = replace(spec["shape"], fmt=fmt, bits=8 if fmt == "int8" else spec["shape"].bits)
        base = write_random_gptq(shape, work / slug(shape))
        merged = work / (slug(shape) + "-lota-merged")
        log(f"infer: {shape.describe()}, prompt {spec['prompt']} tokens")
        made = run_worker(dict(kind="merged_checkpoint", model_dir=str(base), out_dir=str(merged),
                               device=cfg["device"], dtype=None, rank=cfg["rank"], omega=max(1, cfg["rank"] // 8),
                               threads=cfg.get("threads")), env, log)
        models = list(INFER_MODELS) if fmt == "gptq" else ["base", "merged"]  # PEFT's LoRA: on GPTQ only
        job = dict(kind="infer", base_dir=str(base), merged_dir=str(merged), device=cfg["device"], dtype=None,
                   rank=cfg["rank"], prompt=spec["prompt"], warmup=spec["warmup"], repeats=spec["repeats"],
                   decode_steps=spec["decode_steps"], threads=cfg.get("threads"), models=models)
        measured = run_worker(job, env, log)
        rows += [dict(model=shape.name, fmt=fmt, describe=shape.describe(), method=method, prompt=spec["prompt"],
                      **measured[method], **(made if method == "merged" else {})) for method in models]
    return rows


def bench_merge(cfg: dict, work: Path, env: dict, log) -> dict:
    spec = cfg["merge"]
    shape = spec["shape"]
    t0 = time.time()
    path = write_random_gptq(shape, work / slug(shape))
    log(f"merge: {shape.describe()} (checkpoint ready in {time.time() - t0:.0f} s)")
    job = dict(kind="merge", model_dir=str(path), work_dir=str(work / "merge-out"), device=cfg["device"],
               dtype="float16", rank=cfg["rank"], save=spec["save"], dense=False, threads=cfg.get("threads"))
    result = dict(model=shape.name, describe=shape.describe(), full_8b=shape.layers == 32, **run_worker(job, env, log))
    if spec.get("dense"):  # in a process of its own: two 8B-shaped models need not fit in memory together
        result["merge_dense_s"] = run_worker(dict(job, dense=True, save=False), env, log)["merge_s"]
    result["merge_l4q_s"] = run_worker(dict(job, method="l4q", save=False), env, log)["merge_s"]
    for fmt in FORMATS[1:]:  # the same merges in the other formats
        other = replace(shape, fmt=fmt, bits=8 if fmt == "int8" else shape.bits)
        other_path = write_random_gptq(other, work / slug(other))
        log(f"merge: {other.describe()}")
        other_job = dict(job, model_dir=str(other_path), save=False, sizes=False)
        result[f"{fmt}_merge_s"] = run_worker(other_job, env, log)["merge_s"]
        result[f"{fmt}_merge_l4q_s"] = run_worker(dict(other_job, method="l4q"), env, log)["merge_s"]
    return result


def bench_stream(cfg: dict, work: Path, env: dict, log) -> dict:
    """The streaming merge (merge --stream) against the in-memory one (load, merge_and_unload, save), each in a fresh
    process: time and whole-process peak RSS, for a LoTA adapter with random ternary A, B on every projection. Shapes
    with an extrapolation count are merged streaming only and scaled to that many layers (shards of one layer)."""
    spec, out = cfg["stream"], []
    runs = [(s, None) for s in spec["shapes"]] + list(spec.get("extrapolate", []))
    for shape, full_layers in runs:
        path = write_random_gptq(shape, work / slug(shape))
        size = _dir_bytes(path, "*.safetensors")
        log(f"stream: {shape.describe()} ({size / 2**30:.2f} GiB of weights)")
        job = dict(model_dir=str(path), adapter_dir=str(work / "stream-adapter"), out_dir=str(work / "stream-out"),
                   device="cpu", dtype="float16", rank=cfg["rank"], threads=cfg.get("threads"))
        run_worker(dict(job, kind="stream_prep"), env, log)
        row = dict(model=shape.describe(), layers=shape.layers, checkpoint_bytes=size,
                   stream=run_worker(dict(job, kind="merge_stream"), env, log))
        if spec.get("in_memory") and full_layers is None:
            row["in_memory"] = run_worker(dict(job, kind="merge_in_memory"), env, log)
        if full_layers is not None:
            row["extrapolated_to_layers"] = full_layers
        out.append(row)
        shutil.rmtree(work / "stream-out", ignore_errors=True)
        shutil.rmtree(work / "stream-adapter", ignore_errors=True)
    return dict(rows=out)


def _dir_bytes(path: Path, pattern: str = "*") -> int:
    return sum(p.stat().st_size for p in Path(path).glob(pattern) if p.is_file())


def stream_table(r: dict, targets: list) -> str:
    lines = ["| checkpoint | weights (GiB) | in-memory: s / peak RSS (GiB) | streaming: s / peak RSS (GiB) | "
             "stream peak RSS / checkpoint | stream time / in-memory |", "|---|---|---|---|---|---|"]
    for row in r["rows"]:
        gib = row["checkpoint_bytes"] / 2**30
        s = row["stream"]
        mem = row.get("in_memory")
        rss_ratio = s["peak_rss_mib"] / 1024 / gib
        time_ratio = s["seconds"] / mem["seconds"] if mem else None
        name = row["model"]
        if row.get("extrapolated_to_layers"):
            scale = row["extrapolated_to_layers"] / row["layers"]
            name += (f"; all {row['extrapolated_to_layers']} layers, extrapolated: {gib * scale:.1f} GiB, "
                     f"~{s['seconds'] * scale / 60:.0f} min, peak RSS about the same (one shard at a time)")
        lines.append(f"| {name} | {gib:.2f} | " + (f"{mem['seconds']:.0f} / {mem['peak_rss_mib'] / 1024:.2f}" if mem
                                                    else "-") +
                     f" | {s['seconds']:.0f} / {s['peak_rss_mib'] / 1024:.2f} | {rss_ratio:.2f} | " +
                     (f"{time_ratio:.2f}" if time_ratio is not None else "-") + " |")
        if not row.get("extrapolated_to_layers"):
            targets.append((TARGETS["stream_rss"][0] + f" ({row['model']})", "-", f"{rss_ratio:.2f}",
                            status(rss_ratio <= TARGETS["stream_rss"][1])))
            if time_ratio is not None:
                targets.append((TARGETS["stream_time"][0] + f" ({row['model']})", "-", f"{time_ratio:.2f}x",
                                status(time_ratio <= TARGETS["stream_time"][1])))
    return "\n".join(lines) + ("\n\nPeak RSS is the whole worker process's (VmHWM), imports included (about 0.5 GiB of "
                               "torch and transformers).")


def bench_merge_lora(cfg: dict, work: Path, env: dict, log) -> dict:
    """merge_lora, layer by layer on the preset's layer shapes (each distinct shape once, random data), and end to end
    on a random checkpoint where the preset names one (a random LoRA, random token calibration)."""
    spec = cfg["merge_lora"]
    shape, (batches, batch, seq) = spec["layers"], spec["calib"]
    by_shape: dict = {}  # (in, out) -> the layers of a block with that shape
    for name, kn in shape.linear_shapes().items():
        by_shape.setdefault(kn, []).append(name)
    rows = []
    for (k, n), names in by_shape.items():
        log(f"merge_lora: one layer [{k} -> {n}] ({', '.join(names)})")
        rows.append(dict(layers=names, **run_worker(dict(kind="merge_lora_layer", in_features=k, out_features=n,
                                                         bits=shape.bits, group_size=shape.group_size,
                                                         threads=cfg.get("threads")), env, log)))
    # q, k, v share their input, as do gate and up: merge_lora computes one Hessian per distinct input
    result = dict(shape=shape.describe(), block_layers=len(shape.linear_shapes()), blocks=shape.layers,
                  calib_tokens=batches * batch * seq, layer_rows=rows,
                  input_widths=[shape.linear_shapes()[n][0] for n in ("self_attn.q_proj", "self_attn.o_proj",
                                                                       "mlp.gate_proj", "mlp.down_proj")])
    if spec.get("model") is not None:
        path = write_random_gptq(spec["model"], work / slug(spec["model"]))
        log(f"merge_lora: end to end on {spec['model'].describe()}")
        job = dict(kind="merge_lora", model_dir=str(path), device=cfg["device"], dtype="float32", rank=cfg["rank"],
                   calib_batches=batches, calib_batch=batch, calib_seq=seq, threads=cfg.get("threads"))
        result["model"] = run_worker(job, env, log)
        result["model_scales"] = run_worker(dict(job, train_scales=True), env, log)
    return result


def merge_lora_table(r: dict) -> str:
    """Per distinct layer shape, then the whole model: measured end to end, or estimated from the layers."""
    lines = [f"{r['shape']}. Each distinct layer shape once, random codes and a random rank-64 update, in a process of "
             "its own: the input Hessian's cost per 1k calibration tokens, the rounding with error feedback, the same "
             "with the scales refit (2 rounds), and the peak resident memory of the job (the layer, its Hessian and "
             "the work buffers; the model is not loaded).", "",
             "| layers | in -> out | Hessian s / 1k tokens | rounding s | with scales s | peak MiB (scales) |",
             "|---|---|---|---|---|---|"]
    per_block_round = per_block_scales = per_block_h = 0.0
    for row in r["layer_rows"]:
        names = ", ".join(n.split(".")[-1] for n in row["layers"])
        lines.append(f"| {names} | {row['in_features']} -> {row['out_features']} | {row['hessian_s_per_1k_tokens']:.3f} | "
                     f"{row['round_s']:.2f} | {row['round_scales_s']:.2f} | {row['round_scales_peak_mib']:.0f} |")
        per_block_round += row["round_s"] * len(row["layers"])
        per_block_scales += row["round_scales_s"] * len(row["layers"])
    hessian = {row["in_features"]: row["hessian_s_per_1k_tokens"] for row in r["layer_rows"]}
    per_block_h = sum(hessian[k] for k in r["input_widths"])
    tokens = r["calib_tokens"]
    est = r["blocks"] * (per_block_round + per_block_h * tokens / 1000)
    est_s = r["blocks"] * (per_block_scales + per_block_h * tokens / 1000)
    lines += ["", f"Whole model, estimated from these rows ({r['blocks']} blocks, {tokens:,} calibration tokens; the "
              f"calibration forward passes not included): {est / 60:.1f} min, {est_s / 60:.1f} min with the scales "
              "refit. Memory beyond the loaded model: the largest row's peak plus the calibration activations."]
    for key, label in (("model", "codes"), ("model_scales", "codes and scales")):
        if key in r:
            m = r[key]
            lines.append(f"- End to end ({label}), measured: {m['merge_s']:.0f} s for {m['layers']} layers "
                         f"({m['per_layer_s']:.2f} s per layer in rounding), {m['calibration_tokens']:,} calibration "
                         f"tokens; peak resident memory {m['peak_mib']:.0f} MiB, the loaded LoRA model "
                         f"{m['loaded_mib']:.0f} MiB of it.")
    return "\n".join(lines)


def jsonable(x):
    if isinstance(x, ModelShape):
        return asdict(x)
    if isinstance(x, dict):
        return {k: jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    return x


def slug(shape: ModelShape) -> str:
    name = f"{shape.name}-{shape.layers}l-{shape.vocab}v-{shape.dtype}" + ("" if shape.fmt == "gptq" else f"-{shape.fmt}")
    return "".join(c if c.isalnum() else "-" for c in name)[:80]


# ---- report ---------------------------------------------------------------------------------------------

def status(ok: bool | None) -> str:
    return "n/a" if ok is None else ("PASS" if ok else "MISS")


def train_tables(rows: list[dict], targets: list) -> str:
    out = []
    for model, rank in dict.fromkeys((r["model"], r["rank"]) for r in rows):
        group = {r["method"]: r for r in rows if (r["model"], r["rank"]) == (model, rank)}
        lora = group.get("lora")
        first = next(iter(group.values()))
        where = f"{model}, r = {rank}"
        out += [f"### {first['describe']}; r = {rank}", "",
                f"{first['tokens']} tokens per step, kernel {first['kernel']}, LoTA omega = round(0.75 r), L4Q "
                "lora_alpha = 2 r like LoRA's.", "",
                "| method | step time, median (s) | spread min-max (s) | x LoRA | target | "
                "peak memory (MiB) | x LoRA | target | growth during steps (MiB) | trainable params |",
                "|---|---|---|---|---|---|---|---|---|---|"]
        for method, label in TRAIN_METHODS.items():
            r = group.get(method)
            if r is None:
                continue
            t, m = r["step_s"], r["peak_mib"]
            rt = t["median"] / lora["step_s"]["median"] if lora else None
            rm = m / lora["peak_mib"] if lora else None
            is_lota = method.startswith("lota") or method == "l4q"
            kt, km = ("l4q_time", "l4q_mem") if method == "l4q" else ("train_time", "train_mem")
            ok_t = (rt <= TARGETS[kt][1]) if (is_lota and rt is not None) else None
            ok_m = (rm <= TARGETS[km][1]) if (is_lota and rm is not None) else None
            if is_lota:
                targets.append((f"{TARGETS[kt][0]} ({where}, {label})", TARGETS[kt][2], f"{rt:.2f}x", status(ok_t)))
                targets.append((f"{TARGETS[km][0]} ({where}, {label})", TARGETS[km][2],
                                f"{rm:.2f}x ({(rm - 1) * 100:+.0f}%)", status(ok_m)))
            out.append(f"| {label} | {t['median']:.4f} | {t['min']:.4f}-{t['max']:.4f} | "
                       f"{'-' if rt is None else f'{rt:.2f}'} | {status(ok_t) if is_lota else ''} | {m:.0f} | "
                       f"{'-' if rm is None else f'{rm:.2f}'} | {status(ok_m) if is_lota else ''} | "
                       f"{r['growth_mib']:.0f} | {r['trainable_params'] / 1e6:.2f}M |")
        out.append("")
    out.append(f"Memory: {rows[0]['memory_method']}.")
    return "\n".join(out)


def infer_table(rows: list[dict], targets: list) -> str:
    out = []
    for fmt in dict.fromkeys(r.get("fmt", "gptq") for r in rows):
        out += _infer_table([r for r in rows if r.get("fmt", "gptq") == fmt], fmt, targets)
    return "\n".join(out)


def _infer_table(rows: list[dict], fmt: str, targets: list) -> list[str]:
    by = {r["method"]: r for r in rows}
    base, merged, lora = by["base"], by["merged"], by.get("lora")
    out = [f"### {base['describe']}", "",
           f"Default kernel: {base['kernel']}. The merged checkpoint moved {merged['codes_moved']:,} of "
           f"{merged['codes_total']:,} codes (random dense ternary A, B, omega = r / 8). Batch 1; prefill of "
           f"{base['prompt']} tokens, decode with the KV cache.", "",
           "| model | prefill (tokens/s) | x base | decode latency, median (ms) | spread min-max (ms) | x base |",
           "|---|---|---|---|---|---|"]
    for method, label in INFER_MODELS.items():
        r = by.get(method)
        if r is None:
            continue
        d = r["decode_s"]
        label = f"{FORMAT_NAMES[fmt]} {label}" if method == "base" else label
        out.append(f"| {label} | {r['prefill_tok_s']:.1f} | {r['prefill_tok_s'] / base['prefill_tok_s']:.3f} | "
                   f"{d['median'] * 1e3:.2f} | {d['min'] * 1e3:.2f}-{d['max'] * 1e3:.2f} | "
                   f"{d['median'] / base['decode_s']['median']:.3f} |")
    out.append("")
    pre_vs_base = merged["prefill_tok_s"] / base["prefill_tok_s"] - 1
    dec_vs_base = merged["decode_s"]["median"] / base["decode_s"]["median"] - 1
    tol = TARGETS["infer_base"][1]
    name = f"{TARGETS['infer_base'][0]} ({FORMAT_NAMES[fmt]})"
    targets += [(f"{name}: prefill throughput", "-", f"{pre_vs_base * 100:+.1f}%", status(abs(pre_vs_base) <= tol)),
                (f"{name}: decode latency", "-", f"{dec_vs_base * 100:+.1f}%", status(abs(dec_vs_base) <= tol))]
    if lora is not None:
        pre_vs_lora = merged["prefill_tok_s"] / lora["prefill_tok_s"]
        dec_vs_lora = lora["decode_s"]["median"] / merged["decode_s"]["median"]
        targets += [(f"{TARGETS['infer_lora'][0]}: prefill", TARGETS["infer_lora"][2], f"{pre_vs_lora:.2f}x",
                     status(pre_vs_lora >= TARGETS["infer_lora"][1])),
                    (f"{TARGETS['infer_lora'][0]}: decode", TARGETS["infer_lora"][2], f"{dec_vs_lora:.2f}x",
                     status(dec_vs_lora >= TARGETS["infer_lora"][1]))]
    return out


def merge_table(r: dict, targets: list) -> str:
    limit = TARGETS["merge"][1]
    mib = lambda b: f"{b / 2**20:,.1f} MiB"  # noqa: E731
    rows = [("merge_and_unload(), random ternary A, B (uniform over {-1, 0, 1})",
             f"{r['merge_s']:.1f} s ({r['ns_per_code']:.2f} ns per code, {r['codes'] / 1e9:.2f}G codes in "
             f"{r['layers']} layers)")]
    mine = [(TARGETS["merge"][0] + " (random ternary A, B)", TARGETS["merge"][2], r["merge_s"])]
    if "merge_dense_s" in r:
        rows.append(("merge_and_unload(), dense +-1 A, B (worst case: P computed for every code)",
                     f"{r['merge_dense_s']:.1f} s ({r['merge_dense_s'] / r['codes'] * 1e9:.2f} ns per code)"))
        mine.append((TARGETS["merge"][0] + " (worst case: dense +-1 A, B)", TARGETS["merge"][2], r["merge_dense_s"]))
    if "merge_l4q_s" in r:
        rows.append(("L4Q merge_and_unload() (W0 + BA quantized into new codes, r = 64, every layer)",
                     f"{r['merge_l4q_s']:.1f} s ({r['merge_l4q_s'] / r['codes'] * 1e9:.2f} ns per code)"))
        mine.append(("L4Q " + TARGETS["merge"][0], "-", r["merge_l4q_s"]))
    labels = [(f"{fmt}_merge{kind}_s", f"{FORMAT_NAMES[fmt]}{' 8-bit' if fmt == 'int8' else ''}: " + text)
              for fmt in FORMATS[1:] for kind, text in (("", "LoTA merge_and_unload(), random ternary A, B"),
                                                        ("_l4q", "L4Q merge_and_unload()"))]
    for key, label in labels:
        if key in r:
            rows.append((label, f"{r[key]:.1f} s ({r[key] / r['codes'] * 1e9:.2f} ns per code)"))
            mine.append((label.split(":")[0] + " " + ("L4Q " if "l4q" in key else "LoTA ") + TARGETS["merge"][0],
                         "-", r[key]))
    # The < 60 s target is an 8B model's: a smaller shape (the real model's) reports its times without one.
    if r["full_8b"]:
        rows.insert(1, ("target < 60 s", status(r["merge_s"] < limit)))
        targets += [(name, paper, f"{sec:.1f} s", status(sec < limit)) for name, paper, sec in mine]
    rows += [("memory held during the merge (RSS over the runtime)",
              f"{r['rss_before_merge_mib']:,.0f} MiB before, peak {r['merge_peak_rss_mib']:,.0f} MiB"),
             ("model load (gptq_torch, not part of the merge)", f"{r['load_s']:.1f} s")]
    if "save_s" in r:
        rows.append(("save_pretrained of the merged model", f"{r['save_s']:.1f} s "
                                                            f"({mib(r['merged_checkpoint_bytes'])} written)"))
    lora_b = r["lora_fp16_adapter_bytes"]
    rows += [("fp16 LoRA adapter file, same rank and layers", mib(lora_b))]
    if "lota_ship_adapter_bytes" in r:
        rows += [("LoTA adapter file, save_latents=False (ternary A, B at 2 bits per value, each scale's change in "
                  "units in the last place)",
                  f"{mib(r['lota_ship_adapter_bytes'])} ({r['lota_ship_adapter_bytes'] / lora_b:.3f}x LoRA fp16)")]
    rows += [("LoTA adapter file, defaults (+ fp32 latent A, B to resume training exactly)",
              f"{mib(r['lota_adapter_bytes'])} ({r['lota_adapter_bytes'] / lora_b:.3f}x LoRA fp16)")]
    return "\n".join([f"### {r['describe']}", "", "| | |", "|---|---|"] + [f"| {a} | {b} |" for a, b in rows])


def render(record: dict) -> str:
    m, cfg = record["machine"], record["config"]
    targets: list = []
    parts = [f"# Speed and memory benchmark, preset `{record['preset']}`", "",
             f"{m['date']} on {m['cpu']} ({m['cores']} cores, {m['ram_gib']} GiB RAM"
             f"{', ' + m['gpu'] if m['gpu'] else ', no GPU'}); torch {m['torch']}, transformers {m['transformers']}, "
             f"peft {m['peft']}, gptqmodel {m['gptqmodel']}; commit {m['git_commit']}; load average at the end "
             f"{m['load_average']}.", "",
             f"Settings: device {cfg['device']}, {cfg['dtype']} training, the same rank for every method "
             f"(r = {cfg['rank']} unless a table says otherwise), "
             f"torch.compile {cfg['compile']} (TORCHDYNAMO_DISABLE={'1' if cfg['compile'] == 'off' else '0'} in every "
             f"process), torch threads {cfg.get('threads') or 'default'}. Wall time {record['wall_s']:.0f} s.", ""]
    if record.get("note"):
        parts += [f"**Note:** {record['note']}", ""]
    if "train" in record:
        parts += ["## Training", "", train_tables(record["train"], targets), ""]
    if "infer" in record:
        parts += ["## Inference (merged vs base vs unmerged LoRA)", "", infer_table(record["infer"], targets), ""]
    if "merge" in record:
        parts += ["## Merge and adapter size", "", merge_table(record["merge"], targets), ""]
    if "merge_lora" in record:
        parts += ["## merge_lora (a PEFT LoRA onto the base's grid)", "", merge_lora_table(record["merge_lora"]), ""]
    if "stream" in record:
        parts += ["## Streaming merge (merge --stream) vs in memory", "", stream_table(record["stream"], targets), ""]
    parts += ["## Targets", "", "| target | paper | measured | status |", "|---|---|---|---|"]
    parts += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in targets]
    return "\n".join(parts) + "\n"


PARTS = ("train", "infer", "merge", "merge_lora", "stream")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="cpu", choices=sorted(PRESETS))
    ap.add_argument("--only", nargs="+", choices=PARTS, default=list(PARTS), help="run these parts only (default: all)")
    ap.add_argument("--compile", choices=["on", "off"], default=None,
                    help="torch.compile of gptqmodel's dequantization, for every method (default: the preset's)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads in every worker (default: torch's)")
    ap.add_argument("--work-dir", default=str(HERE / "runs" / "speed"),
                    help="where the random GPTQ checkpoints are cached (the 8B-shaped one takes ~3.7 GB)")
    ap.add_argument("--out", default=str(RESULTS), help="where speed-<preset>.{md,json} go")
    ap.add_argument("--note", default="", help="free text stored with the results (e.g. 'shared, noisy machine')")
    ap.add_argument("--tag", default="", help="suffix of the result files: speed-<preset>-<tag>.* (e.g. a part run alone)")
    args = ap.parse_args(argv)

    cfg = dict(PRESETS[args.preset])
    if args.compile:
        cfg["compile"] = args.compile
    cfg["threads"] = args.threads
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    env = worker_env(cfg, args.threads)
    t_start = time.time()

    def log(msg):
        print(f"[{time.time() - t_start:6.0f} s] {msg}", flush=True)

    record: dict = dict(preset=args.preset, note=args.note, parts=args.only, config=jsonable(cfg),
                        machine=machine_info())  # the commit measured: taken before the run
    if "train" in args.only:
        record["train"] = bench_train(cfg, work, env, log)
    if "infer" in args.only:
        record["infer"] = bench_infer(cfg, work, env, log)
    if "merge" in args.only:
        record["merge"] = bench_merge(cfg, work, env, log)
    if "merge_lora" in args.only:
        record["merge_lora"] = bench_merge_lora(cfg, work, env, log)
    if "stream" in args.only:
        record["stream"] = bench_stream(cfg, work, env, log)
    record["wall_s"] = time.time() - t_start
    record["machine"]["load_average"] = os.getloadavg() if hasattr(os, "getloadavg") else None

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"speed-{args.preset}" + (f"-{args.tag}" if args.tag else "")
    text = render(record)
    (out / f"{stem}.json").write_text(json.dumps(record, indent=1, default=str))
    (out / f"{stem}.md").write_text(text)
    print(text)
    print(f"wrote {out / stem}.{{md,json}} in {record['wall_s']:.0f} s")


if __name__ == "__main__":
    main()
