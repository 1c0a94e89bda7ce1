"""The `peft-lota` command line: merge, inspect, verify, and the fine-tuning and calibration scripts.

    peft-lota merge BASE ADAPTER OUT [--push REPO] [--safe]
    peft-lota inspect ADAPTER_OR_CHECKPOINT [--base BASE]
    peft-lota verify CHECKPOINT --against ADAPTER_OR_MODEL [--base BASE]
    peft-lota finetune ...     (examples/finetune.py's flags)
    peft-lota calibrate ...    (examples/calibrate.py's flags)

Exit codes: 0 done (and every check passed); 1 a check failed (the checkpoint is not what it should be);
2 a usage mistake (a missing folder, an adapter of another kind, ...), reported in one line.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Optional

os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(min(os.cpu_count() or 2, 2)))  # gptqmodel's pool on small machines

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


class UsageError(Exception):
    """A mistake in what the user asked for: reported as one line, exit code 2."""


# ---- loading -------------------------------------------------------------------------------------------------

def _quiet() -> None:
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    warnings.filterwarnings("ignore")
    logging.getLogger("optimum").setLevel(logging.ERROR)
    try:
        from logbar import LogBar

        LogBar.shared().setLevel(logging.ERROR)
    except ImportError:
        pass
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def _config(path: str) -> dict:
    """config.json of a local folder or a Hub repo."""
    local = Path(path) / "config.json"
    if local.exists():
        return json.loads(local.read_text())
    if Path(path).exists():
        raise UsageError(f"{path} has no config.json: it is not a model folder.")
    try:
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(path).to_dict()
    except Exception as err:  # noqa: BLE001
        raise UsageError(f"{path}: not a local folder, and not a model on the Hub ({type(err).__name__}).") from None


def _quantization(path: str) -> Optional[dict]:
    """The checkpoint's quantization_config in a format peft_lota reads, None for full precision."""
    from peft_lota.loading import quantization_config

    _config(path)  # a clear error for a path that is no model
    try:
        return quantization_config(path)
    except ValueError as err:
        raise UsageError(str(err)) from None


def _format(qc: dict):
    from peft_lota.formats import config_format

    return config_format(qc)


def load_model(path: str, dtype: str = "float32"):
    """A quantized checkpoint with its layout-keeping kernel (what adapters read and merge into), or a
    full-precision model."""
    import torch

    from peft_lota.loading import load_model as load

    _quantization(path)
    return load(path, dtype=getattr(torch, dtype))


def _adapter_config(path: str) -> dict:
    file = Path(path) / "adapter_config.json"
    if not file.exists():
        raise UsageError(f"{path} has no adapter_config.json: it is not a saved adapter.")
    config = json.loads(file.read_text())
    if config.get("peft_type") not in ("LOTA", "L4Q"):
        raise UsageError(f"{path} is a {config.get('peft_type')} adapter; peft-lota merges LoTA and L4Q adapters "
                         "(a LoRA can be turned into L4Q with peft_lota.l4q_from_lora).")
    return config


def _probe(model, seq: int = 32):
    import torch

    vocab = model.config.vocab_size
    return torch.randint(0, vocab, (2, seq), generator=torch.Generator().manual_seed(0))


def _logits(model, ids):
    import torch

    with torch.no_grad():
        return model(input_ids=ids).logits


def _quant_buffers(model) -> dict:
    from peft_lota.formats import quantized_tensors

    return quantized_tensors(model)


def _same_buffers(a, b) -> bool:
    import torch

    x, y = _quant_buffers(a), _quant_buffers(b)
    return x.keys() == y.keys() and all(torch.equal(x[k].cpu(), y[k].cpu()) for k in x)


def _codes_moved(model) -> Optional[tuple[int, int]]:
    import peft_lota

    layers = [m for m in model.modules() if isinstance(m, (peft_lota.LotaLayer, peft_lota.L4QLayer))]
    deltas = [d for m in layers for d in [m.get_delta_codes(m.active_adapters[0])] if d is not None]
    if not deltas:
        return None
    return sum(int((d != 0).sum()) for d in deltas), sum(d.numel() for d in deltas)


def _print_table(rows) -> None:
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")


# ---- commands ------------------------------------------------------------------------------------------------

def cmd_merge(args) -> int:
    import torch
    from peft import PeftModel

    import peft_lota  # noqa: F401  (registers LOTA and L4Q)

    adapter_cfg = _adapter_config(args.adapter)
    base = load_model(args.base, args.dtype)
    try:
        model = PeftModel.from_pretrained(base, args.adapter)
    except ValueError as err:
        raise UsageError(str(err).splitlines()[0]) from None
    model.eval()
    ids = _probe(model)
    adapter_logits = _logits(model, ids)
    moved = _codes_moved(model)
    merged = model.merge_and_unload(safe_merge=args.safe)
    merged_logits = _logits(merged, ids)
    exact = bool(torch.equal(merged_logits, adapter_logits))
    out = Path(tempfile.mkdtemp()) / "checkpoint" if args.push and not args.out else Path(args.out)
    merged.save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model"):
        for src in (Path(args.adapter) / name, Path(args.base) / name):
            if src.exists() and not (out / name).exists():
                (out / name).write_bytes(src.read_bytes())
    reloaded = load_model(str(out), args.dtype)
    same_codes = _same_buffers(merged, reloaded)
    same_logits = bool(torch.equal(_logits(reloaded, ids), merged_logits))
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    fmt = _format(qc)
    settings = ", ".join(f"{k} {v}" for k, v in fmt.describe(qc) if k not in ("kind", "made by"))
    rows = [("method", adapter_cfg["peft_type"]), ("adapter", args.adapter), ("base", args.base),
            ("codes moved", f"{moved[0]:,} of {moved[1]:,}" if moved else "(from full precision: every code is new)"),
            ("written", f"{out} ({fmt.name}: {settings})"),
            ("kernels that can serve it", ", ".join(n for n, _, ok in fmt.kernels(qc) if ok) or "none known"),
            ("merged logits == adapter logits", exact), ("reloaded codes, zeros, scales == merged", same_codes),
            ("reloaded logits == merged", same_logits)]
    note = fmt.fast_path_note(qc)
    if note:
        rows.append(("note", note))
    if args.push:
        merged.push_to_hub(args.push)
        rows.append(("pushed to", args.push))
    _print_table(rows)
    return EXIT_OK if exact and same_codes and same_logits else EXIT_FAILED


def _human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def cmd_inspect(args) -> int:
    path = Path(args.path)
    if (path / "adapter_config.json").exists():
        cfg = _adapter_config(args.path)
        rows = [("kind", f"{cfg['peft_type']} adapter"), ("base it was made for", cfg.get("base_model_name_or_path")),
                ("rank r", cfg.get("r")), ("target modules", cfg.get("target_modules"))]
        if cfg["peft_type"] == "LOTA":
            rows += [("omega", cfg.get("omega")), ("offset", cfg.get("offset")), ("train mode", cfg.get("train_mode")),
                     ("max step", cfg.get("max_step")), ("trained scales", cfg.get("train_scales"))]
        else:
            rows += [("lora_alpha", cfg.get("lora_alpha")), ("learned scales", cfg.get("learn_scales")),
                     ("grid (bits, group, sym)", (cfg.get("bits"), cfg.get("group_size"), cfg.get("sym")))]
        layers = cfg.get("base_layers") or {}
        if layers:
            first = next(iter(layers.values()))
            rows.append(("adapted layers", f"{len(layers)} ({first[0]}, e.g. {first[3]}-bit with {first[4]} groups)"
                         if first[0] != "dense" else f"{len(layers)} (full precision)"))
        files = sorted(p for p in path.iterdir() if p.is_file())
        rows.append(("files", ", ".join(f"{p.name} {_human(p.stat().st_size)}" for p in files)))
        if args.base:
            from peft import PeftModel

            import peft_lota  # noqa: F401

            model = PeftModel.from_pretrained(load_model(args.base), args.path)
            moved = _codes_moved(model)
            rows.append(("codes moved", f"{moved[0]:,} of {moved[1]:,}" if moved else "-"))
            _print_table(rows)
            print("\nper layer (codes moved):")
            for name, m in model.named_modules():
                d = m.get_delta_codes(m.active_adapters[0]) if hasattr(m, "get_delta_codes") else None
                if d is not None:
                    print(f"  {name.removeprefix('base_model.model.')}: {int((d != 0).sum()):,} of {d.numel():,}")
            return EXIT_OK
        _print_table(rows)
        return EXIT_OK
    qc = _quantization(args.path)
    if qc is None:
        raise UsageError(f"{args.path} is neither a saved adapter nor a quantized (GPTQ, AWQ, compressed-tensors, LLM.int8) checkpoint.")
    fmt = _format(qc)
    weights = sum(p.stat().st_size for p in path.glob("*.safetensors")) if path.exists() else None
    rows = fmt.describe(qc) + [("made by", ", ".join((qc.get("meta") or {}).get("quantizer", [])) or "-"),
                               ("weights", _human(weights) if weights else "-")]
    _print_table(rows)
    print("\nkernels:")
    for name, devices, ok in fmt.kernels(qc):
        print(f"  {'yes' if ok else 'no ':3s}  {name} ({devices})")
    note = fmt.fast_path_note(qc)
    if note:
        print(f"\nnote: {note}")
    return EXIT_OK


def cmd_verify(args) -> int:
    import torch
    from peft import PeftModel

    import peft_lota  # noqa: F401

    checkpoint = load_model(args.checkpoint, args.dtype)
    ids = _probe(checkpoint)
    against = Path(args.against)
    if (against / "adapter_config.json").exists():
        cfg = _adapter_config(args.against)
        base = args.base or cfg.get("base_model_name_or_path")
        if not base:
            raise UsageError("the adapter does not name its base model: pass --base.")
        reference = PeftModel.from_pretrained(load_model(base, args.dtype), args.against)
        reference.eval()
        rows = [("checkpoint", args.checkpoint), ("against", f"{cfg['peft_type']} adapter {args.against} on {base}")]
        ok = bool(torch.equal(_logits(reference, ids), _logits(checkpoint, ids)))
        rows.append(("logits == the adapter model's", ok))
    else:
        reference = load_model(args.against, args.dtype)
        same = _same_buffers(checkpoint, reference)
        ok = same and bool(torch.equal(_logits(reference, ids), _logits(checkpoint, ids)))
        rows = [("checkpoint", args.checkpoint), ("against", args.against),
                ("codes, zeros, scales equal", same), ("logits equal", ok)]
    _print_table(rows)
    return EXIT_OK if ok else EXIT_FAILED


def _script(name: str):
    import importlib

    try:
        return importlib.import_module(f"peft_lota.scripts.{name}")
    except ImportError as err:
        raise UsageError(f"{err}. peft-lota {name} needs the extras: pip install 'peft_lota[examples]'.") from None


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in ("finetune", "calibrate"):  # the scripts parse their own (many) flags
        try:
            _script(argv[0]).main(argv[1:])
        except UsageError as err:
            print(f"peft-lota {argv[0]}: {err}", file=sys.stderr)
            return EXIT_USAGE
        return EXIT_OK
    ap = argparse.ArgumentParser(prog="peft-lota", description=__doc__.split("\n\n")[0],
                                 epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")
    m = sub.add_parser("merge", help="merge a LoTA or L4Q adapter into its base and write a standard quantized checkpoint (its base's format; GPTQ from full precision)",
                       description="Load the base the right way, apply the adapter, merge exactly, save (or push) the "
                                   "checkpoint, reload it and compare codes and logits.")
    m.add_argument("base", help="the base model the adapter was trained on (GPTQ, AWQ, compressed-tensors or LLM.int8 checkpoint, or full precision for L4Q)")
    m.add_argument("adapter", help="the saved adapter folder")
    m.add_argument("out", nargs="?", help="where to write the merged checkpoint (optional with --push)")
    m.add_argument("--push", metavar="REPO", help="also push the checkpoint to this Hub repo")
    m.add_argument("--safe", action="store_true", help="decode every packed layer before writing it (safe_merge)")
    m.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    m.set_defaults(func=cmd_merge)
    i = sub.add_parser("inspect", help="describe an adapter or a quantized (GPTQ, AWQ, compressed-tensors, LLM.int8) checkpoint (and which kernels can serve it)",
                       description="An adapter: method, settings, the base it was made for, files; with --base, the "
                                   "codes it moves per layer. A checkpoint: format, bits, group size, sym, act-order "
                                   "and which kernels can run it.")
    i.add_argument("path")
    i.add_argument("--base", help="(adapters) the base model, to count the codes the adapter moves per layer")
    i.set_defaults(func=cmd_inspect)
    v = sub.add_parser("verify", help="check that a checkpoint is exactly an adapter model, or another checkpoint",
                       description="Compare a merged checkpoint's logits with the adapter model's (--against ADAPTER), "
                                   "or its codes, zeros, scales and logits with another checkpoint (--against MODEL).")
    v.add_argument("checkpoint")
    v.add_argument("--against", required=True, help="a saved adapter folder, or another checkpoint")
    v.add_argument("--base", help="the adapter's base model (default: the one its adapter_config.json names)")
    v.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    v.set_defaults(func=cmd_verify)
    sub.add_parser("finetune", help="fine-tune with LoTA or L4Q through a stock Trainer, merge, save, verify "
                                    "(examples/finetune.py; peft-lota finetune --help)", add_help=False)
    sub.add_parser("calibrate", help="calibrate a full-precision model into a low-bit GPTQ checkpoint (ApiQ; "
                                     "examples/calibrate.py; peft-lota calibrate --help)", add_help=False)
    args = ap.parse_args(argv)
    if args.command == "merge" and not args.out and not args.push:
        ap.error("merge needs OUT, --push REPO, or both")
    _quiet()
    try:
        return args.func(args)
    except UsageError as err:
        print(f"peft-lota {args.command}: {err}", file=sys.stderr)
        return EXIT_USAGE
    except (FileNotFoundError, FileExistsError, PermissionError) as err:
        print(f"peft-lota {args.command}: {err}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
