"""GPU smoke check: the formats that need no gptqmodel, trained, merged, saved and reloaded on CUDA, and a LoTA step's
time against PEFT LoRA's at the layer shapes of 1B-8B models.

Prepared here, run on a lent GPU machine (an image with torch and Python 3.12, nothing downloadable there):

    python benchmarks/gpu_smoke.py --fetch-wheels build/gpu-wheels   # here: the wheels the image lacks (~25 MB)
    bash benchmarks/gpu_smoke.sh                                      # there (carry build/gpu-wheels): installs them
                                                                      # with --no-deps, then runs this script
    python benchmarks/gpu_smoke.py --device cpu --quick               # here: the same checks on CPU, small shapes

Checks, each on its own (a failure is reported and the next one runs): compressed-tensors W4A16 and a GGUF file of
every block type (built on the spot from the tests' tiny Llama/Qwen2), LLM.int8 if bitsandbytes imports: a fresh
adapter computes the base bit for bit, a few LoTA steps on the GPU move codes, the merged model computes what the
adapter model did, its save reloaded the stock way holds the same tensors and logits. Then the speed rows: one
layer of each shape, bf16 activations of 4096 tokens, forward and backward, median of 20 after warm-up: LoTA on
a GGUF Q4_0 and a compressed-tensors 4-bit layer against LoRA r16 on an nn.Linear of the same shape. Prints a
table and writes it, with the machine, to --out (default $OUT/gpu_smoke.json when $OUT is set).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
# What the GPU image lacks (it has torch and what torch needs): the versions this project tests against
# (constraints/lower.txt) and their dependencies, at the versions installed here, torch's own left out.
WANTED = ["transformers==5.23.0", "peft==0.21.2", "accelerate==1.15.0", "compressed-tensors==0.20.1", "gguf==0.19.0"]
IMAGE_HAS = ("torch", "triton", "nvidia-", "numpy", "sympy", "mpmath", "networkx", "jinja2", "markupsafe",
             "typing-extensions", "typing_extensions", "setuptools", "filelock", "fsspec", "cuda-", "pytorch-")
SHAPES = {"1B (2048 x 2048, 2048 x 8192)": [(2048, 2048), (2048, 8192)],
          "8B (4096 x 4096, 4096 x 14336)": [(4096, 4096), (4096, 14336)]}


def _closure() -> list[str]:
    """name==version of WANTED and everything they require (markers read for Python 3.12 on Linux), at the versions
    installed here (a set pip resolved and the tests pass on), torch's stack left out."""
    from importlib import metadata

    from packaging.requirements import Requirement

    env = {"python_version": "3.12", "python_full_version": "3.12.0", "sys_platform": "linux",
           "platform_system": "Linux", "platform_machine": "x86_64", "implementation_name": "cpython", "extra": ""}
    seen, todo = {}, [Requirement(w).name for w in WANTED]
    while todo:
        name = todo.pop()
        key = name.lower().replace("_", "-")
        if key in seen or key.startswith(IMAGE_HAS):
            continue
        dist = metadata.distribution(name)
        seen[key] = f"{dist.metadata['Name']}=={dist.version}"
        for line in dist.requires or []:
            req = Requirement(line)
            if req.marker is None or req.marker.evaluate(env):
                todo.append(req.name)
    return sorted(seen.values())


def fetch_wheels(folder: Path) -> None:
    """Download, for Python 3.12 on x86-64 Linux, the wheels of _closure() (no dependency resolution there)."""
    folder.mkdir(parents=True, exist_ok=True)
    pins = _closure()
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(folder),
                    "--only-binary=:all:", "--python-version", "3.12", "--implementation", "cp", "--platform",
                    "manylinux2014_x86_64", "--platform", "manylinux_2_28_x86_64", "--platform", "any", *pins],
                   check=True)
    size = sum(p.stat().st_size for p in folder.iterdir())
    print(f"{len(pins)} wheels ({', '.join(pins)}), {size / 2**20:.1f} MiB in {folder}")


def exact_checks(device: str, root: Path) -> list[dict]:
    """(format, ok, detail) rows: the format x method contract of the tests, on `device`."""
    sys.path.insert(0, str(ROOT / "tests"))
    sys.path.insert(0, str(ROOT / "examples"))
    import tiny_models as tm

    x = tm.X.to(device)
    rows = []

    def run(name, load, path, tensors, load_saved=None):
        t0 = time.time()
        try:
            with tempfile.TemporaryDirectory() as tmp:
                tm.adapt_merge_save_reload("lota", load, path, tensors, Path(tmp), inputs=(x,), load_saved=load_saved)
            rows.append({"check": name, "ok": True, "seconds": round(time.time() - t0, 1)})
        except Exception as err:  # noqa: BLE001 - reported, and the next check runs
            rows.append({"check": name, "ok": False, "error": f"{type(err).__name__}: {err}"[:400],
                         "trace": traceback.format_exc()[-1500:]})

    try:
        import peft_lota.formats as formats

        ct = tm.build_ct_checkpoint(tm.CtSpec("qwen2", 4, 32), root)
        run("compressed-tensors W4A16 g32 (Qwen2, bias), LoTA", lambda p: tm.load_ct(p).to(device), ct,
            formats.quantized_tensors)
    except Exception as err:  # noqa: BLE001
        rows.append({"check": "compressed-tensors", "ok": False, "error": f"{type(err).__name__}: {err}"[:400]})
    try:
        from peft_lota import load_gguf

        for arch in ("llama", "qwen2"):
            path = tm.build_gguf(arch, root)
            run(f"GGUF Q4_0/Q4_1/Q5_0/Q5_1/Q8_0 ({arch}), LoTA", lambda p: load_gguf(p).to(device), path,
                lambda m: {n: t for n, t in m.named_buffers() if n.endswith("qblocks")},
                load_saved=lambda folder, name=path.name: load_gguf(folder / name).to(device))
    except Exception as err:  # noqa: BLE001
        rows.append({"check": "GGUF", "ok": False, "error": f"{type(err).__name__}: {err}"[:400]})
    try:
        import bitsandbytes  # noqa: F401
        from transformers import AutoModelForCausalLM, BitsAndBytesConfig

        fp = tm.build_float_checkpoint("qwen2", root)
        q8 = BitsAndBytesConfig(load_in_8bit=True)
        run("LLM.int8 (Qwen2), LoTA",
            lambda p: AutoModelForCausalLM.from_pretrained(str(p), quantization_config=q8, device_map=device),
            fp, formats.quantized_tensors,
            load_saved=lambda folder: AutoModelForCausalLM.from_pretrained(str(folder), device_map=device))
    except ImportError:
        rows.append({"check": "LLM.int8", "ok": None, "error": "bitsandbytes not installed: not run"})
    return rows


def _step_time(model, x, device: str, repeats: int) -> float:
    import torch

    def step():
        out = model(x)
        out.float().pow(2).mean().backward()

    for _ in range(3):
        step()
    times = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        step()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def speed_rows(device: str, tokens: int, repeats: int, shapes: dict) -> list[dict]:
    """LoTA on one quantized layer (GGUF Q4_0, compressed-tensors 4-bit g128) against LoRA r16 on an nn.Linear."""
    import torch
    from peft import LoraConfig, inject_adapter_in_model
    from torch import nn

    from peft_lota import LotaConfig
    from peft_lota.formats import compressed_tensors as ct
    from peft_lota.formats.gguf import BLOCK_TYPES, GGUFLinear

    class One(nn.Module):
        def __init__(self, layer):
            super().__init__()
            self.proj = layer

        def forward(self, x):
            return self.proj(x)

    rows = []
    g = torch.Generator().manual_seed(0)
    for label, layer_shapes in shapes.items():
        for K, N in layer_shapes:
            x = torch.randn(tokens, K, generator=g).to(device, torch.bfloat16).requires_grad_(True)
            dense = nn.Linear(K, N, bias=False).to(device, torch.bfloat16)
            lora = inject_adapter_in_model(LoraConfig(r=16, target_modules=["proj"]), One(dense))
            t_lora = _step_time(lora, x, device, repeats)
            codes = torch.randint(0, 16, (N, K), dtype=torch.uint8, generator=g)
            d = (torch.rand(N, K // 32, generator=g) * 1e-2).half()
            raw = BLOCK_TYPES["Q4_0"].encode(codes, d, None)
            gguf_layer = GGUFLinear(raw.to(device), "Q4_0", K, N, None, "proj.weight", None)
            t_gguf = _step_time(inject_adapter_in_model(LotaConfig(r=16, target_modules=["proj"]), One(gguf_layer)), x,
                                device, repeats)
            ct_layer = ct.build_layer(codes.t().contiguous(), torch.full((K // 128, N), 8, dtype=torch.int32),
                                      (torch.rand(K // 128, N, generator=g) * 1e-2).half(),
                                      torch.arange(K) // 128, None, 4, 128, True).to(device)
            t_ct = _step_time(inject_adapter_in_model(LotaConfig(r=16, target_modules=["proj"]), One(ct_layer)), x, device,
                              repeats)
            rows.append({"model": label, "shape": f"{K} x {N}", "lora_ms": round(1e3 * t_lora, 3),
                         "lota_gguf_q4_0_ms": round(1e3 * t_gguf, 3), "lota_ct_w4a16_ms": round(1e3 * t_ct, 3),
                         "gguf_ratio": round(t_gguf / t_lora, 2), "ct_ratio": round(t_ct / t_lora, 2)})
            print(rows[-1], flush=True)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--fetch-wheels", type=Path, default=None, help="download the wheels the GPU image lacks, exit")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--quick", action="store_true", help="small shapes and few repeats (a CPU rehearsal)")
    ap.add_argument("--out", type=Path, default=Path(os.environ["OUT"]) / "gpu_smoke.json" if os.environ.get("OUT")
                    else None)
    args = ap.parse_args(argv)
    if args.fetch_wheels:
        fetch_wheels(args.fetch_wheels)
        return 0
    import torch

    import peft_lota  # noqa: F401 - quiets the libraries' notices

    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA device: run with --device cpu to rehearse")
    machine = {"torch": torch.__version__, "python": sys.version.split()[0], "device": args.device,
               "gpu": torch.cuda.get_device_name(0) if args.device == "cuda" else None}
    with tempfile.TemporaryDirectory() as root:
        checks = exact_checks(args.device, Path(root))
    for row in checks:
        print(f"{'ok ' if row['ok'] else 'n/a' if row['ok'] is None else 'FAIL'}  {row['check']}  "
              f"{row.get('seconds', '')}{row.get('error', '')}", flush=True)
    shapes = {"quick (256 x 256, 256 x 1024)": [(256, 256), (256, 1024)]} if args.quick else SHAPES
    speed = speed_rows(args.device, 256 if args.quick else 4096, 3 if args.quick else 20, shapes)
    print("\n| model | layer | LoRA r16 ms | LoTA GGUF Q4_0 ms (x LoRA) | LoTA compressed-tensors ms (x LoRA) |")
    print("|---|---|---|---|---|")
    for r in speed:
        print(f"| {r['model']} | {r['shape']} | {r['lora_ms']} | {r['lota_gguf_q4_0_ms']} ({r['gguf_ratio']}x) | "
              f"{r['lota_ct_w4a16_ms']} ({r['ct_ratio']}x) |")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"machine": machine, "checks": checks, "speed": speed}, indent=1))
    return 0 if all(r["ok"] is not False for r in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
