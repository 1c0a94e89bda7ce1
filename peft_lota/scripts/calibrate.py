r"""Calibrate a full-precision causal LM into a low-bit GPTQ checkpoint, block by block (ApiQ, optional saliency).

    python examples/calibrate.py --model_name_or_path path/to/fp-model --output_dir my-model-2bit \
        --calib_file calib.txt --bits 2 --group_size 128 [--saliency]

Each decoder block's quantizer (scales) and a LoRA inside it are trained so that the quantized block reproduces
the full-precision block's outputs on the calibration sequences (inputs coming from the already-calibrated
blocks); with --saliency a regulariser first keeps the weights the language-model loss is most sensitive to
close to their full-precision values. The result is merged exactly and saved as a standard GPTQ checkpoint,
reloaded with stock transformers and compared (codes, logits). Prints each block's output error before and
after, and the perplexity of the full-precision and the calibrated model.

Data: --calib_file / --eval_file (plain text, or JSON/JSONL with --text_column), or --stdlib: the Python standard
library's own source, split as in examples/demo_model.py (train files for calibration, eval files for perplexity).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

from peft_lota import verify
from peft_lota.inputs import UsageError

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"  # demo_model.py, in a source checkout


EVAL_WINDOWS = 256  # evaluation windows of --seq_len tokens
JSON_LIMIT = 64 << 20  # a .json file is parsed whole: larger ones are refused (a .jsonl or .txt is read in pieces)
LINE_LIMIT = 16 << 20  # one .jsonl line


def _docs(path: str, text_column: str):
    """The documents of a .jsonl file (line by line) or a .json file (whole, at most JSON_LIMIT bytes), read lazily.
    Damaged input is a ValueError naming the file."""
    from peft_lota.paths import regular_text_file

    p = regular_text_file(path, "--calib_file / --eval_file")
    if p.suffix == ".json":
        if p.stat().st_size > JSON_LIMIT:
            raise ValueError(f"{p} is {p.stat().st_size / 2**20:,.0f} MiB of JSON, read whole: give it as .jsonl (one "
                             "object per line) or plain text, which are read only as far as needed.")
        try:
            rows = json.loads(p.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError, RecursionError) as err:
            raise ValueError(f"{p} is not valid UTF-8 JSON ({str(err)[:80] or 'nested too deeply'}).") from None
        if not isinstance(rows, list):
            raise ValueError(f"{p} holds a JSON {type(rows).__name__}: give a list of objects with a {text_column!r} field.")
        yield from (_field(r, text_column, p, i) for i, r in enumerate(rows))
    elif p.suffix == ".jsonl":
        with open(p, "rb") as f:
            for i, line in enumerate(iter(lambda: f.readline(LINE_LIMIT + 1), b"")):
                if len(line) > LINE_LIMIT:
                    raise ValueError(f"{p}: line {i + 1} is longer than {LINE_LIMIT >> 20} MiB: one JSON object per "
                                     "line, please (or give plain text).")
                if line.strip():
                    try:
                        yield _field(json.loads(line), text_column, p, i)
                    except (ValueError, UnicodeDecodeError, RecursionError) as err:
                        raise ValueError(f"{p}: line {i + 1} is not a JSON object "
                                         f"({str(err)[:80] or 'nested too deeply'}).") from None


def _field(row, column: str, path, i: int) -> str:
    if not isinstance(row, dict) or not isinstance(row.get(column), str):
        raise ValueError(f"{path}: row {i + 1} has no text field {column!r} (--text_column).")
    return row[column]


def token_stream(tokenizer, docs, want: float) -> list[int]:
    """The documents' tokens, each followed by EOS, tokenized one at a time and only until `want` tokens are in
    hand: a corpus of any size costs a few MB."""
    ids: list[int] = []
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    for doc in docs:
        ids += tokenizer(doc, add_special_tokens=False)["input_ids"] + eos
        if len(ids) >= want:
            break
    return ids


def file_ids(tokenizer, path: str, text_column: str, want: int) -> list[int]:
    """A calibration or evaluation file's tokens, read only until `want` tokens are in hand (a .txt file is one
    document, tokenized piece by piece: paths.read_token_ids)."""
    from peft_lota.paths import read_token_ids

    if Path(path).suffix in (".json", ".jsonl"):
        return token_stream(tokenizer, _docs(path, text_column), want)
    ids, _, whole = read_token_ids(tokenizer, path, "--calib_file / --eval_file", want, 1 << 40)
    return ids + ([tokenizer.eos_token_id] if whole and tokenizer.eos_token_id is not None else [])


def token_windows(tokenizer, ids: list[int], n: int, seq_len: int, seed: int = 0) -> torch.Tensor:
    """`n` windows of `seq_len` tokens, chosen reproducibly from the token stream: [n, seq_len]."""
    stream = torch.tensor(ids, dtype=torch.long)
    blocks = stream[: len(stream) // seq_len * seq_len].view(-1, seq_len)
    if len(blocks) == 0:
        raise SystemExit(f"calibrate.py: the calibration text has fewer than --seq_len {seq_len} tokens.")
    pick = torch.randperm(len(blocks), generator=torch.Generator().manual_seed(seed))[:n]
    return blocks[pick]


def parse_args(argv=None) -> argparse.Namespace:
    """The command line (--help: the flags below and the module's description)."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model_name_or_path", required=True, help="a full-precision causal LM (folder or Hub id)")
    ap.add_argument("--output_dir", required=True, help="where the calibrated GPTQ checkpoint is written")
    data = ap.add_mutually_exclusive_group(required=True)
    data.add_argument("--calib_file", help="calibration text: .txt, or .json/.jsonl with --text_column")
    data.add_argument("--stdlib", action="store_true", help="calibrate and evaluate on the Python standard library")
    ap.add_argument("--eval_file", help="text to measure perplexity on (default: none, or the stdlib eval split)")
    ap.add_argument("--text_column", default="text")
    ap.add_argument("--samples", type=int, default=128, help="calibration sequences")
    ap.add_argument("--seq_len", type=int, default=256, help="tokens per calibration sequence")
    ap.add_argument("--batch_size", type=int, default=4, help="sequences per calibration step")
    ap.add_argument("--bits", type=int, default=2, choices=[2, 3, 4, 8])
    ap.add_argument("--group_size", type=int, default=128, help="input rows per group (-1: one group per column)")
    ap.add_argument("--sym", action="store_true", help="symmetric grid (default asymmetric)")
    ap.add_argument("--r", type=int, default=64, help="rank of the LoRA inside each quantizer")
    ap.add_argument("--epochs", type=int, default=10, help="passes over the calibration set per block (and stage)")
    ap.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate of the LoRA factors")
    ap.add_argument("--scale_lr", type=float, default=5e-3, help="AdamW learning rate of the scales")
    ap.add_argument("--saliency", action="store_true", help="add the saliency-weighted regulariser (three stages)")
    ap.add_argument("--lambda_reg", type=float, default=1.0, help="weight of the saliency regulariser")
    ap.add_argument("--keep_adapter", action="store_true",
                    help="also save the unmerged L4Q adapter (output_dir/adapter), to fine-tune from")
    ap.add_argument("--baseline", help="a quantized checkpoint of the same model (e.g. its GPTQ at the same bits) to "
                    "measure on the same evaluation text: the summary then says how much of its gap to full "
                    "precision the calibration closed")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.baseline and not (args.stdlib or args.eval_file):
        ap.error("--baseline is measured on the evaluation text: give --eval_file (or --stdlib).")
    return args


def load_ids(args: argparse.Namespace, tokenizer) -> tuple[list[int], list[int] | None]:
    """(calibration tokens, evaluation tokens or None): of the given files, each read only as far as eight times the
    tokens it gives (its windows are drawn from those), or of the standard library's split (--stdlib)."""
    if args.stdlib:
        if not (EXAMPLES / "demo_model.py").exists():
            raise SystemExit("calibrate: --stdlib uses examples/demo_model.py, which needs a source checkout; give "
                             "--calib_file instead.")
        sys.path.insert(0, str(EXAMPLES))
        import demo_model as dm

        return (token_stream(tokenizer, dm.corpus_texts("train"), math.inf),
                token_stream(tokenizer, dm.corpus_texts("eval"), math.inf))
    try:
        calib = file_ids(tokenizer, args.calib_file, args.text_column, 8 * args.samples * args.seq_len)
        evals = file_ids(tokenizer, args.eval_file, args.text_column, 8 * EVAL_WINDOWS * args.seq_len) \
            if args.eval_file else None
    except ValueError as err:
        raise UsageError(str(err)) from None
    return calib, evals


def check_output(args: argparse.Namespace) -> None:
    """Before anything loads: --output_dir is a folder apart from the model, --baseline and the data files (not
    one of them, inside or around one, compared by device and inode)."""
    from peft_lota.paths import separate_output

    out = Path(args.output_dir)
    inputs = {"model (--model_name_or_path)": args.model_name_or_path, "--baseline": args.baseline,
              "--calib_file": args.calib_file, "--eval_file": args.eval_file}
    try:
        separate_output(out, inputs, "--output_dir")
    except ValueError as err:
        raise UsageError(str(err)) from None


def print_block(report) -> None:
    """calibrate's on_block: one line per calibrated block, as it finishes."""
    print(f"block {report.index}: output MSE {report.mse_before:.4g} -> {report.mse_after:.4g} "
          f"({report.seconds:.1f} s)", flush=True)


def merge_save_reload(calibrated, tok, probe: torch.Tensor, out: Path, dtype: torch.dtype):
    """Merge the calibrated model, save it with the tokenizer, reload it with the layout-keeping kernel; checks that
    the merged and the reloaded model give the calibrated model's logits exactly (verify). Returns (reloaded,
    checks)."""
    import peft_lota

    merged = verify.merge_checked(calibrated, probe)
    reloaded = verify.save_checked(merged.model, out, probe, merged.merged_logits,
                                   lambda folder: peft_lota.load_model(str(folder), dtype=dtype), tokenizer=tok)
    return reloaded.model, dict(merged_equals_calibrated=merged.exact, reloaded_equals_merged=reloaded.same_logits)


def baseline_rows(baseline: str, eval_blocks: torch.Tensor, dtype: torch.dtype, ppl_fp: float,
                  ppl_calibrated: float) -> dict:
    """--baseline's perplexity, and the share of its gap to full precision that the calibration closed."""
    import peft_lota

    ppl = verify.perplexity(peft_lota.load_model(baseline, dtype=dtype), eval_blocks)
    gap = ppl - ppl_fp
    return {"ppl_baseline": ppl, "baseline_gap_closed": round((ppl - ppl_calibrated) / gap, 3) if gap > 0 else None}


def main(argv=None) -> dict:
    """Calibrate, merge, save, reload and compare; prints and writes (calibration_summary.json) the summary."""
    args = parse_args(argv)
    check_output(args)

    # peft_lota before transformers: it sets gptqmodel's worker count before anything can import gptqmodel
    import peft_lota
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t_start = time.time()
    from peft_lota.paths import check_index

    try:
        check_index(args.model_name_or_path)  # (transformers would follow any name the index gives)
    except ValueError as err:
        raise UsageError(str(err)) from None
    dtype = getattr(torch, args.dtype)
    tok = AutoTokenizer.from_pretrained(args.model_name_or_path)
    calib_ids, eval_ids = load_ids(args, tok)
    windows = token_windows(tok, calib_ids, args.samples, args.seq_len, args.seed)
    batches = list(windows.split(args.batch_size))
    eval_blocks = token_windows(tok, eval_ids, EVAL_WINDOWS, args.seq_len, seed=1) if eval_ids else None
    model = AutoModelForCausalLM.from_pretrained(args.model_name_or_path, dtype=dtype)
    summary = {"bits": args.bits, "group_size": args.group_size, "sym": args.sym, "saliency": args.saliency,
               "samples": len(windows), "seq_len": args.seq_len, "epochs": args.epochs}
    if eval_blocks is not None:
        summary["ppl_fp"] = verify.perplexity(model, eval_blocks)
        print(f"full precision: perplexity {summary['ppl_fp']:.3f}", flush=True)

    t0 = time.time()
    calibrated = peft_lota.calibrate(model, batches, bits=args.bits, group_size=args.group_size, sym=args.sym,
                                     r=args.r, epochs=args.epochs, lr=args.lr, scale_lr=args.scale_lr,
                                     saliency_reg=args.saliency, lambda_reg=args.lambda_reg, merge=False,
                                     on_block=print_block, seed=args.seed)
    summary["calibration_seconds"] = round(time.time() - t0, 1)
    out = Path(args.output_dir)
    if args.keep_adapter:
        calibrated.save_pretrained(out / "adapter")
    reloaded, checks = merge_save_reload(calibrated, tok, windows[:2], out, dtype)
    summary.update(checks, output_dir=str(out))
    if eval_blocks is not None:
        summary["ppl_calibrated"] = verify.perplexity(reloaded, eval_blocks)
        if args.baseline:
            summary.update(baseline_rows(args.baseline, eval_blocks, dtype, summary["ppl_fp"],
                                         summary["ppl_calibrated"]))
    summary["total_seconds"] = round(time.time() - t_start, 1)
    (out / "calibration_summary.json").write_text(json.dumps(summary, indent=1))
    for key, value in summary.items():
        print(f"{key:28s} {value:.3f}" if isinstance(value, float) else f"{key:28s} {value}")
    return summary
