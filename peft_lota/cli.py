"""The `peft-lota` command line: merge, inspect, verify, and the fine-tuning and calibration scripts.

    peft-lota merge BASE ADAPTER OUT [--push REPO] [--safe]
    peft-lota merge BASE LORA_ADAPTER OUT --calib_file FILE [--keep_scales]
    peft-lota inspect ADAPTER_OR_CHECKPOINT [--base BASE]
    peft-lota verify CHECKPOINT --against ADAPTER_OR_MODEL [--base BASE]
    peft-lota convert CHECKPOINT OUT --to FORMAT
    peft-lota finetune ...     (examples/finetune.py's flags)
    peft-lota calibrate ...    (examples/calibrate.py's flags)

Exit codes: 0 done (and every check passed); 1 a check failed (the checkpoint is not what it should be), or a
bug in peft_lota (shown with its traceback); 2 a usage mistake (a missing folder, an adapter of another kind, a
damaged file, ...), reported in one line.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import tempfile
import traceback
import warnings
from pathlib import Path

from . import inputs

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
UsageError = inputs.UsageError  # (what the scripts raised before inputs.py)


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


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive whole number")
    return value


def _print_table(rows) -> None:
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")


# ---- commands ------------------------------------------------------------------------------------------------

def _save_and_reload(args, merged, dtype: str, ids, merged_logits):
    """Save the merged model (to OUT, or a temporary folder when only --push is given) with the tokenizer (the
    adapter's, else the base's: verify.tokenizer_files), reload it and compare: (out, its format, its
    quantization_config, the table rows this adds, both checks passed)."""
    from peft_lota import verify

    out = Path(tempfile.mkdtemp()) / "checkpoint" if args.push and not args.out else Path(args.out)
    check = verify.save_checked(merged, out, ids, merged_logits, lambda folder: inputs.load_checked(str(folder), dtype),
                                tokenizer_from=[args.adapter, args.base])
    qc, fmt = check.quantization_config, check.format()
    settings = ", ".join(f"{k} {v}" for k, v in fmt.describe(qc) if k not in ("kind", "made by"))
    rows = [("written", f"{out} ({fmt.name}: {settings})" if settings else f"{out} ({fmt.name})"),
            ("kernels that can serve it", ", ".join(n for n, _, ok in fmt.kernels(qc) if ok) or "none known")]
    return out, fmt, qc, rows, (check.same_tensors, check.same_logits)


def _push_and_print(args, merged, out: Path, fmt, qc: dict, rows: list, ok: bool) -> int:
    """The format's note, the --push (a failure keeps the saved checkpoint and says where), the table; exit code."""
    note = fmt.fast_path_note(qc)
    if note:
        rows.append(("note", note))
    if args.push:
        try:
            merged.push_to_hub(args.push)
        except Exception as err:  # noqa: BLE001  (network, credentials, the Hub's answer: not a bug of ours)
            rows.append(("pushed to", f"FAILED: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"))
            _print_table(rows)
            print(f"peft-lota merge: the push to {args.push} failed; the checkpoint is in {out}: push it again with "
                  "huggingface-cli upload, or rerun with --push when the Hub can be reached.", file=sys.stderr)
            return EXIT_FAILED
        rows.append(("pushed to", args.push))
    _print_table(rows)
    return EXIT_OK if ok else EXIT_FAILED


def _to_format(args, merged):
    """The merged model in --format's format (the same grid, repacked: convert.py), or as it is without --format."""
    if not args.format:
        return merged
    from peft_lota import formats
    from peft_lota.convert import convert_model

    if formats.model_format(merged).name == args.format:
        return merged
    try:
        return convert_model(merged, args.format)
    except ValueError as err:
        raise inputs.UsageError(f"--format {args.format}: {str(err).splitlines()[0]} (nothing was written; merge without "
                         "--format).") from None


def cmd_merge_lora(args) -> int:
    from peft_lota import merge_lora, verify
    from peft_lota.lora.merge import MergeRefused

    if not args.calib_file:
        raise inputs.UsageError(f"{args.adapter} is a LoRA: it is merged onto the base's own grid, each layer's codes chosen "
                         "with GPTQ's error feedback, which needs the layers' inputs on real text. Give --calib_file "
                         "FILE (UTF-8 text like the LoRA's training data).")
    if inputs.quantization(args.base) is None:
        from peft_lota.formats import format_list

        raise inputs.UsageError(f"{args.base} is a full-precision model: merge a LoRA into it with PEFT's merge_and_unload(). "
                         f"peft-lota merges a LoRA into a quantized ({format_list()}) base.")
    batches = inputs.calibration_blocks(args, [args.adapter, args.base])
    dtype = args.dtype or inputs.own_dtype(args.base)
    try:  # the adapter read from its files, so that every format works (PEFT cannot wrap packed compressed-tensors)
        merged = merge_lora(inputs.load_checked(args.base, dtype), batches, lora=args.adapter, train_scales=not args.keep_scales)
    except MergeRefused as err:
        raise inputs.UsageError(str(err)) from None
    report = merged.merge_lora_report
    merged = _to_format(args, merged)
    ids = verify.probe_ids(merged)
    out, fmt, qc, written, (same_codes, same_logits) = _save_and_reload(args, merged, dtype, ids, verify.logits(merged, ids))
    moved = sum(r["codes_moved"] for r in report.layers.values())
    held = len(batches) - max(1, len(batches) // 8)  # merge_lora's default split
    rows = [("method", "LoRA, merged onto the base's grid (merge_lora: GPTQ error feedback"
             + (")" if args.keep_scales else ", scales refit)")), ("adapter", args.adapter), ("base", args.base),
            ("dtype", dtype if args.dtype else f"{dtype} (the base's; --dtype to change)"),
            ("calibration", f"{report.calibration_tokens:,} tokens from {args.calib_file} ({held} batches; "
                            f"{len(batches) - held} held out to score the merge)"),
            ("held-out loss, unmerged LoRA", f"{report.loss_lora:.4f}"),
            ("held-out loss, merged", f"{report.loss_merged:.4f} ({report.gap_pct:+.2f}% perplexity)"),
            ("held-out loss, base without the LoRA", f"{report.loss_base:.4f}"),
            ("top-1 agreement with the LoRA", f"{report.top1_agreement_pct:.1f}%"),
            ("codes moved", f"{moved:,} in {len(report.layers)} layers ({report.seconds:.0f} s)"),
            *written, ("reloaded codes, zeros, scales == merged", same_codes), ("reloaded logits == merged", same_logits)]
    if report.dense_layers:
        rows.append(("merged by PEFT (full precision)", ", ".join(report.dense_layers)))
    return _push_and_print(args, merged, out, fmt, qc, rows, same_codes and same_logits)


def cmd_merge(args) -> int:
    from peft_lota import verify

    gguf_base = inputs.gguf_file(args.base) is not None
    if args.base.endswith(".gguf") and not gguf_base:
        raise inputs.UsageError(f"BASE {args.base}: no such GGUF file.")
    if args.out:
        if args.out.endswith(".gguf") and not gguf_base:
            raise inputs.UsageError(f"OUT {args.out} names a GGUF file, and {args.base} is not one: a merge writes its "
                                    "base's own format. Give a folder.")
        inputs.check_output(args.out, {"base": args.base, "adapter": args.adapter})
        from peft_lota.export import check_target

        if not args.out.endswith(".gguf"):
            check_target(args.out)  # a folder the save could not write into is refused now, not after the merge
    adapter_cfg = inputs.adapter_config(args.adapter)
    if args.format and gguf_base:
        raise inputs.UsageError("--format repacks GPTQ, AWQ and compressed-tensors grids; a GGUF base is written back "
                                "as GGUF: drop --format.")
    if args.stream:
        return cmd_merge_stream(args, adapter_cfg)
    if adapter_cfg["peft_type"] == "LORA":
        return cmd_merge_lora(args)
    if args.calib_file or args.keep_scales:
        raise inputs.UsageError(f"{args.adapter} is a {adapter_cfg['peft_type']} adapter, which merges exactly as trained: "
                         "--calib_file and --keep_scales are for LoRA adapters only. Drop them.")
    inputs.check_base(adapter_cfg, args.base)
    dtype = args.dtype or inputs.own_dtype(args.base)
    model = inputs.apply_adapter(inputs.load_checked(args.base, dtype), args.adapter)
    ids = verify.probe_ids(model)
    check = verify.merge_checked(model, ids, safe_merge=args.safe)
    merged, merged_logits, moved, exact = check.model, check.merged_logits, check.codes_moved, check.exact
    if args.format:  # the same grid, repacked; its kernel may round the products differently
        merged = _to_format(args, merged)
        merged_logits = verify.logits(merged, ids)
    out, fmt, qc, written, (same_codes, same_logits) = _save_and_reload(args, merged, dtype, ids, merged_logits)
    rows = [("method", adapter_cfg["peft_type"]), ("adapter", args.adapter), ("base", args.base),
            ("dtype", dtype if args.dtype else f"{dtype} (the base's; --dtype to change)"),
            ("codes moved", f"{moved[0]:,} of {moved[1]:,}" if moved else "(from full precision: every code is new)"),
            *written, ("merged logits == adapter logits", exact), ("reloaded codes, zeros, scales == merged", same_codes),
            ("reloaded logits == merged", same_logits)]
    return _push_and_print(args, merged, out, fmt, qc, rows, exact and same_codes and same_logits)


def cmd_convert(args) -> int:
    from peft_lota import verify
    from peft_lota.convert import convert_model, same_grid
    from peft_lota.export import check_target

    inputs.check_output(args.out, {"checkpoint": args.checkpoint}, ("conversion", "converted"))
    check_target(args.out)
    qc = inputs.quantization(args.checkpoint)
    if qc is None:
        raise inputs.UsageError(f"{args.checkpoint} is a full-precision model: convert repacks a quantized checkpoint "
                         "(to quantize one, train L4Q from it or run peft-lota calibrate).")
    source_name = inputs.format_of(qc).name
    dtype = args.dtype or inputs.own_dtype(args.checkpoint)
    source = inputs.load_checked(args.checkpoint, dtype)
    from peft_lota import formats

    formats.prepare_model(source)  # read as stored (a compressed-tensors model would decompress at its first forward)
    ids = verify.probe_ids(source)
    source_logits = verify.logits(source, ids)
    try:
        converted = convert_model(inputs.load_checked(args.checkpoint, dtype), args.to)
    except ValueError as err:
        raise inputs.UsageError(str(err).splitlines()[0]) from None
    converted.save_pretrained(args.out, extra_files=verify.tokenizer_files([args.checkpoint]))
    reloaded = inputs.load_checked(args.out, dtype)
    same = same_grid(source, reloaded)
    diff = float((verify.logits(reloaded, ids).float() - source_logits.float()).abs().max())
    out_qc = json.loads((Path(args.out) / "config.json").read_text())["quantization_config"]
    fmt = inputs.format_of(out_qc)
    rows = [("converted", f"{args.checkpoint} ({source_name}) -> {args.out} ({fmt.name})"), ("dtype", dtype),
            ("codes, zeros, scales, group order, bias equal", same),
            ("largest logit difference, each format's own kernel", f"{diff:.3g}" + (
                " (identical)" if diff == 0 else " (the kernels round differently; the weights are the same)")),
            ("kernels that can serve it", ", ".join(n for n, _, ok in fmt.kernels(out_qc) if ok) or "none known")]
    note = fmt.fast_path_note(out_qc)
    if note:
        rows.append(("note", note))
    _print_table(rows)
    return EXIT_OK if same else EXIT_FAILED


def cmd_merge_stream(args, adapter_cfg: dict) -> int:
    """merge --stream: file by file, the model never built; the logits check only for a base below --check_below GiB."""
    import torch

    from peft_lota import verify
    from peft_lota.stream import merge_checkpoint

    if adapter_cfg["peft_type"] == "LORA" or args.calib_file or args.push or args.dtype or args.format:
        raise inputs.UsageError("--stream merges an adapter of peft_lota's own methods into local files in the base's "
                         "format: drop --calib_file, --push, --dtype and --format (a LoRA: merge without --stream; "
                         "push the written folder afterwards; peft-lota convert changes the format).")
    gguf_base = inputs.gguf_file(args.base)
    if gguf_base is None and not Path(args.base).is_dir():
        raise inputs.UsageError(f"--stream reads the base's files: {args.base} is not a local folder or GGUF file.")
    if gguf_base is not None and not args.out.endswith(".gguf"):
        raise inputs.UsageError(f"--stream writes a GGUF base's merge as one file: give OUT as a path ending in .gguf "
                                f"(got {args.out}).")
    try:
        if gguf_base is not None:
            from peft_lota.stream_gguf import merge_gguf

            report = merge_gguf(gguf_base, args.adapter, args.out, count_codes=True)
        else:
            report = merge_checkpoint(args.base, args.adapter, args.out, count_codes=True)
    except ValueError as err:
        raise inputs.UsageError(str(err).splitlines()[0]) from None
    if gguf_base is not None:  # the logits check loads the whole model in float32 (load_gguf): that is its size
        from peft_lota.formats.gguf import read_header

        size = sum(int(t.n_elements) for t in read_header(gguf_base).tensors) * 4 / 2**30
        pieces = f"{len(report.per_shard_seconds)} groups of layers"
    else:
        size = sum(p.stat().st_size for p in Path(args.base).glob("*.safetensors")) / 2**30
        pieces = f"{report.shards} shards"
    rows = [("method", f"{adapter_cfg['peft_type']} (streamed: {'layers in groups' if gguf_base else 'shard by shard'}, "
                       "the model never built)"),
            ("adapter", args.adapter), ("base", args.base), ("written", f"{args.out} ({report.checkpoint_format})"),
            ("codes moved", f"{report.codes_moved:,} of {report.codes:,} in {report.layers} layers"),
            ("merged", f"{pieces} in {report.seconds:.0f} s, peak RSS {report.peak_rss_mib:,.0f} MiB "
                       f"(base {size:.2f} GiB{' in float32' if gguf_base else ''})"),
            ("merged tensors read back == computed", f"True ({report.verified_tensors})")]
    ok = True
    if size <= args.check_below:
        adapter_model = inputs.apply_adapter(inputs.load_checked(args.base), args.adapter).eval()
        ids = verify.probe_ids(adapter_model)
        expected = verify.logits(adapter_model, ids)
        del adapter_model
        ok = bool(torch.equal(verify.logits(inputs.load_checked(args.out), ids), expected))
        rows.append(("reloaded logits == adapter logits", ok))
    else:
        rows.append(("logits check", f"skipped: the base is {size:.1f} GiB, above --check_below {args.check_below:g}"))
    _print_table(rows)
    return EXIT_OK if ok else EXIT_FAILED


def cmd_inspect(args) -> int:
    path = Path(args.path)
    if (path / "adapter_config.json").exists():
        cfg = inputs.adapter_config(args.path)
        rows = [("kind", f"{cfg['peft_type']} adapter"), ("base it was made for", cfg.get("base_model_name_or_path")),
                ("rank r", cfg.get("r")), ("target modules", cfg.get("target_modules"))]
        if cfg["peft_type"] == "LORA":
            rows += [("lora_alpha", cfg.get("lora_alpha")), ("DoRA", bool(cfg.get("use_dora"))),
                     ("merge it", "peft-lota merge BASE ADAPTER OUT --calib_file FILE (onto the base's own grid)")]
            if args.base:
                raise inputs.UsageError("--base counts the codes an adapter of peft_lota's methods moves; a LoRA moves none until it is "
                                 "merged: peft-lota merge BASE ADAPTER OUT --calib_file FILE reports them.")
        else:
            from peft_lota.registry import method

            rows += method(cfg["peft_type"]).describe(cfg)
        layers = cfg.get("base_layers") or {}
        if layers:
            first = next(iter(layers.values()))
            rows.append(("adapted layers", f"{len(layers)} ({first[0]}, e.g. {first[3]}-bit with {first[4]} groups)"
                         if first[0] != "dense" else f"{len(layers)} (full precision)"))
        files = sorted(p for p in path.iterdir() if p.is_file())
        rows.append(("files", ", ".join(f"{p.name} {inputs.human_size(p.stat().st_size)}" for p in files)))
        if args.base:
            inputs.check_base(cfg, args.base)
            model = inputs.apply_adapter(inputs.load_checked(args.base), args.path)
            from peft_lota.tuner_layer import codes_moved

            moved = codes_moved(model)
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
    if inputs.gguf_file(args.path) is not None:
        from peft_lota.formats.gguf import describe_file

        rows = describe_file(inputs.gguf_file(args.path))
        _print_table([(k, inputs.human_size(v) if k == "size" else v) for k, v in rows])
        print("\nkernels:\n  yes  llama.cpp (and Ollama, LM Studio, llama-cpp-python; cpu, cuda, metal)\n  yes  "
              "transformers with gguf_file= (dequantized to dense)")
        return EXIT_OK
    qc = inputs.quantization(args.path)
    if qc is None:
        from peft_lota.formats import format_list

        raise inputs.UsageError(f"{args.path} is neither a saved adapter nor a quantized ({format_list()}) checkpoint.")
    fmt = inputs.format_of(qc)
    weights = sum(p.stat().st_size for p in path.glob("*.safetensors")) if path.exists() else None
    try:  # (a damaged config: a string or null where an object or a number belongs)
        described = fmt.describe(qc)
        meta = qc.get("meta") if isinstance(qc.get("meta"), dict) else {}
        made_by = meta.get("quantizer") if isinstance(meta.get("quantizer"), list) else []
        kernels = fmt.kernels(qc)
        note = fmt.fast_path_note(qc)
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise inputs.UsageError(f"{args.path}/config.json: its quantization_config is incomplete or damaged ({type(err).__name__}: "
                         f"{err}); copy the checkpoint again.") from None
    rows = described + [("made by", ", ".join(map(str, made_by)) or "-"), ("weights", inputs.human_size(weights) if weights else "-")]
    _print_table(rows)
    print("\nkernels:")
    for name, devices, ok in kernels:
        print(f"  {'yes' if ok else 'no ':3s}  {name} ({devices})")
    if note:
        print(f"\nnote: {note}")
    return EXIT_OK


def cmd_verify(args) -> int:
    import torch

    from peft_lota import verify

    against = Path(args.against)
    cfg = inputs.adapter_config(args.against) if (against / "adapter_config.json").exists() else None
    base = (args.base or cfg.get("base_model_name_or_path")) if cfg else None
    if cfg and not base:
        raise inputs.UsageError("the adapter does not name its base model: pass --base.")
    if cfg:
        inputs.check_base(cfg, base)
    dtype = args.dtype or inputs.own_dtype(args.checkpoint)  # compare as the checkpoint loads by default
    checkpoint = inputs.load_checked(args.checkpoint, dtype)
    ids = verify.probe_ids(checkpoint)
    if cfg:
        reference = inputs.apply_adapter(inputs.load_checked(base, dtype), args.against)
        reference.eval()
        rows = [("checkpoint", args.checkpoint), ("against", f"{cfg['peft_type']} adapter {args.against} on {base}"),
                ("dtype", dtype)]
        ok = bool(torch.equal(verify.logits(reference, ids), verify.logits(checkpoint, ids)))
        rows.append(("logits == the adapter model's", ok))
    else:
        reference = inputs.load_checked(args.against, dtype)
        from peft_lota.formats import same_quantized_tensors

        same = same_quantized_tensors(checkpoint, reference)
        ok = same and bool(torch.equal(verify.logits(reference, ids), verify.logits(checkpoint, ids)))
        rows = [("checkpoint", args.checkpoint), ("against", args.against), ("dtype", dtype),
                ("codes, zeros, scales equal", same), ("logits equal", ok)]
    _print_table(rows)
    return EXIT_OK if ok else EXIT_FAILED


def _script(name: str):
    """The script module behind `peft-lota finetune` / `calibrate` (scripts import nothing of the command line)."""
    try:
        if name == "finetune":
            from peft_lota.scripts import finetune as script
        else:
            from peft_lota.scripts import calibrate as script
    except ImportError as err:
        raise inputs.UsageError(f"{err}. peft-lota {name} needs the extras: pip install \".[examples]\" (from a "
                                "clone of peft_lota).") from None
    return script


# The entries of a script's summary that are checks (each must be True); every perplexity and loss must be finite
# (but a --baseline's: that is another model, measured for comparison).
SUMMARY_CHECKS = {"merged_equals_adapter": "merged logits == adapter logits",
                  "reloaded_buffers_equal": "reloaded codes/scales == merged",
                  "reloaded_logits_equal": "reloaded logits == merged", "ranks_agree": "the processes' adapters agree",
                  "merged_equals_calibrated": "merged logits == calibrated",
                  "reloaded_equals_merged": "reloaded == merged"}


def failed_checks(summary: dict) -> list:
    """What failed among a finetune/calibrate summary's own checks (empty: all passed)."""
    failed = [f"{label}: False" for key, label in SUMMARY_CHECKS.items() if summary.get(key) is False]
    measured = [k for k in summary if k.startswith("ppl_") and k != "ppl_baseline" or k == "train_loss"]
    return failed + [f"{k} is {summary[k]}" for k in measured
                     if isinstance(summary[k], float) and not math.isfinite(summary[k])]


def _run_script(name: str, argv: list) -> int:
    summary = _script(name).main(argv)
    failed = failed_checks(summary or {})
    if failed:
        print(f"peft-lota {name}: check failed: {'; '.join(failed)} (the summary above has the details).",
              file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK


def _guarded(command: str, run) -> int:
    """Expected failures as one line (exit 2); anything else is a bug: its traceback and where to report it."""
    from peft_lota.export import UnsafeFolderError
    from peft_lota.tuner import NonFiniteError

    try:
        return run()
    except inputs.UsageError as err:
        print(f"peft-lota {command}: {err}", file=sys.stderr)
        return EXIT_USAGE
    except (UnsafeFolderError, NonFiniteError) as err:  # a folder or an adapter that cannot be used as it is
        print(f"peft-lota {command}: {str(err).splitlines()[0]}", file=sys.stderr)
        return EXIT_USAGE
    except BrokenPipeError:  # `peft-lota inspect X | head`: the reader has what it wanted
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115  (no second error when Python flushes stdout at exit)
        return EXIT_OK
    except OSError as err:  # a file that cannot be read or written (missing, permissions, disk full)
        where = f"{err.filename}: " if err.filename else ""
        print(f"peft-lota {command}: {where}{err.strerror or err}", file=sys.stderr)
        return EXIT_USAGE
    except Exception as err:  # noqa: BLE001
        if type(err).__name__ == "SafetensorError" and "I/O error" in str(err):  # safetensors' write failed (disk full)
            reason = str(err).split("I/O error:", 1)[1].strip()
            print(f"peft-lota {command}: cannot write the checkpoint: {reason}; nothing was changed (the output "
                  "keeps what it held). Free some space, or write elsewhere.", file=sys.stderr)
            return EXIT_USAGE
        traceback.print_exc()
        print(f"peft-lota {command}: this is a bug in peft_lota, not a mistake of yours: please report it to the "
              "peft_lota issue tracker with this traceback.", file=sys.stderr)
        return EXIT_FAILED


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in ("finetune", "calibrate"):  # the scripts parse their own (many) flags
        return _guarded(argv[0], lambda: _run_script(argv[0], argv[1:]))
    ap = argparse.ArgumentParser(prog="peft-lota", description=__doc__.split("\n\n")[0],
                                 epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")
    dtype_help = "activation dtype of the models compared (default: the checkpoint's own, from its config.json)"
    # (Help texts name no method or format: listing them would import the package, seconds before --help prints;
    # `inspect` lists what a checkpoint or adapter is, from the registries.)
    m = sub.add_parser("merge", help="merge an adapter (of peft_lota's methods, or a LoRA) into its base and write a "
                                     "standard quantized checkpoint (its base's format)",
                       description="Load the base the right way, apply the adapter, merge exactly, save (or push) the "
                                   "checkpoint, reload it and compare codes and logits.")
    m.add_argument("base", help="the base model the adapter was trained on: a quantized checkpoint, or a full-precision "
                                "model for a method that quantizes while training")
    m.add_argument("adapter", help="the saved adapter folder")
    m.add_argument("out", nargs="?", help="where to write the merged checkpoint, a folder apart from BASE and ADAPTER "
                                          "(optional with --push)")
    m.add_argument("--push", metavar="REPO", help="also push the checkpoint to this Hub repo")
    m.add_argument("--safe", action="store_true", help="decode every packed layer before writing it (safe_merge)")
    m.add_argument("--format", metavar="FORMAT", help="write the merged model in this format (gptq, awq, compressed-tensors) instead of "
                   "the base's: the same grid repacked, refused where the format cannot hold it (peft-lota convert)")
    m.add_argument("--stream", action="store_true", help="merge file by file without building the model (peak memory "
                   "about one shard: for checkpoints larger than this machine's memory); the base must be a local "
                   "folder of safetensors or a GGUF file (then OUT is a .gguf file)")
    m.add_argument("--check_below", type=float, default=4.0, metavar="GIB", help="with --stream: compare the "
                   "reloaded logits with the adapter model's when the base's weights are at most this many GiB (4)")
    m.add_argument("--dtype", choices=inputs.DTYPES, help=dtype_help.replace("checkpoint's", "base's") +
                   "; the merged config records it.")
    lora = m.add_argument_group("LoRA adapters (merged onto the base's grid with GPTQ error feedback)")
    lora.add_argument("--calib_file", metavar="FILE", help="UTF-8 text like the LoRA's training data: the layers' "
                      "inputs on it weigh each rounding (required for a LoRA)")
    lora.add_argument("--calib_len", type=_positive, default=512, metavar="T", help="tokens per calibration block (512)")
    lora.add_argument("--calib_blocks", type=_positive, default=128, metavar="N", help="at most N blocks, spread over the "
                      "file's first 8 x N x T tokens (128); one in eight is held out to score the merge")
    lora.add_argument("--calib_batch", type=_positive, default=4, metavar="B", help="blocks per forward pass (4)")
    lora.add_argument("--keep_scales", action="store_true", help="keep the base's scales: choose the codes only "
                      "(by default each group's scale is refit too; zero points, bits, group size and g_idx always "
                      "stay the base's)")
    m.set_defaults(func=cmd_merge)
    i = sub.add_parser("inspect", help="describe an adapter or a quantized checkpoint (and which kernels can serve it)",
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
    v.add_argument("--dtype", choices=inputs.DTYPES, help=dtype_help)
    v.set_defaults(func=cmd_verify)
    c = sub.add_parser("convert", help="repack a quantized checkpoint into another format, losslessly (e.g. for a "
                                       "server that takes only one)",
                       description="Read every quantized layer's codes, zero points, scales and group order and write "
                                   "them in the target format; refused with the reason where the target cannot hold "
                                   "them. The result is reloaded and compared layer by layer.")
    c.add_argument("checkpoint")
    c.add_argument("out", help="where to write the converted checkpoint (a folder apart from CHECKPOINT)")
    c.add_argument("--to", required=True, metavar="FORMAT", help="the target format's name (gptq, awq, compressed-tensors: "
                   "the formats peft_lota builds layers of)")
    c.add_argument("--dtype", choices=inputs.DTYPES, help=dtype_help)
    c.set_defaults(func=cmd_convert)
    sub.add_parser("finetune", help="fine-tune a quantized model through a stock Trainer, merge, save, verify "
                                    "(examples/finetune.py; peft-lota finetune --help)", add_help=False)
    sub.add_parser("calibrate", help="calibrate a full-precision model into a low-bit GPTQ checkpoint (ApiQ; "
                                     "examples/calibrate.py; peft-lota calibrate --help)", add_help=False)
    args = ap.parse_args(argv)
    if args.command == "merge" and not args.out and not args.push:
        ap.error("merge needs OUT, --push REPO, or both")
    _quiet()
    return _guarded(args.command, lambda: args.func(args))


if __name__ == "__main__":
    sys.exit(main())
