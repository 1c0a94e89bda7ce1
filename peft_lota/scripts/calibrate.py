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

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"  # demo_model.py, in a source checkout


def read_texts(path: str, text_column: str) -> list[str]:
    p = Path(path)
    if p.suffix in (".json", ".jsonl"):
        rows = [json.loads(line) for line in p.read_text().splitlines() if line.strip()] if p.suffix == ".jsonl" \
            else json.loads(p.read_text())
        return [str(r[text_column]) for r in rows]
    return [p.read_text(encoding="utf-8", errors="replace")]


def token_windows(tokenizer, texts: list[str], n: int, seq_len: int, seed: int = 0) -> torch.Tensor:
    """`n` windows of `seq_len` tokens, chosen reproducibly from the texts joined with EOS: [n, seq_len]."""
    ids: list[int] = []
    for doc in tokenizer(texts, add_special_tokens=False)["input_ids"]:
        ids += doc + ([tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else [])
    stream = torch.tensor(ids)
    blocks = stream[: len(stream) // seq_len * seq_len].view(-1, seq_len)
    if len(blocks) == 0:
        raise SystemExit(f"calibrate.py: the calibration text has fewer than --seq_len {seq_len} tokens.")
    pick = torch.randperm(len(blocks), generator=torch.Generator().manual_seed(seed))[:n]
    return blocks[pick]


@torch.no_grad()
def perplexity(model, blocks: torch.Tensor, batch_size: int = 8) -> float:
    model.eval()
    device = next(model.parameters()).device
    nll, count = 0.0, 0
    for i in range(0, len(blocks), batch_size):
        b = blocks[i:i + batch_size].to(device)
        logits = model(input_ids=b).logits[:, :-1].float()
        nll += torch.nn.functional.cross_entropy(logits.flatten(0, 1), b[:, 1:].flatten(), reduction="sum").item()
        count += b[:, 1:].numel()
    return math.exp(nll / count)


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


def load_texts(args: argparse.Namespace) -> tuple[list[str], list[str] | None]:
    """(calibration texts, evaluation texts or None): the given files, or the standard library's split (--stdlib)."""
    if args.stdlib:
        if not (EXAMPLES / "demo_model.py").exists():
            raise SystemExit("calibrate: --stdlib uses examples/demo_model.py, which needs a source checkout; give "
                             "--calib_file instead.")
        sys.path.insert(0, str(EXAMPLES))
        import demo_model as dm

        return dm.corpus_texts("train"), dm.corpus_texts("eval")
    calib_texts = read_texts(args.calib_file, args.text_column)
    return calib_texts, read_texts(args.eval_file, args.text_column) if args.eval_file else None


def print_block(report) -> None:
    """calibrate's on_block: one line per calibrated block, as it finishes."""
    print(f"block {report.index}: output MSE {report.mse_before:.4g} -> {report.mse_after:.4g} "
          f"({report.seconds:.1f} s)", flush=True)


def merge_save_reload(calibrated, tok, probe: torch.Tensor, out: Path, dtype: torch.dtype):
    """Merge the calibrated model, save it with the tokenizer, reload it with the layout-keeping kernel; checks that
    the merged and the reloaded model give the calibrated model's logits exactly. Returns (reloaded, checks)."""
    import peft_lota

    with torch.no_grad():
        adapter_logits = calibrated(input_ids=probe).logits
    merged = calibrated.merge_and_unload()
    with torch.no_grad():
        merged_logits = merged(input_ids=probe).logits
    merged.save_pretrained(out)
    tok.save_pretrained(out)
    reloaded = peft_lota.load_model(str(out), dtype=dtype)  # the layout-keeping kernel
    with torch.no_grad():
        reloaded_logits = reloaded(input_ids=probe).logits
    return reloaded, dict(merged_equals_calibrated=bool(torch.equal(merged_logits, adapter_logits)),
                          reloaded_equals_merged=bool(torch.equal(reloaded_logits, merged_logits)))


def baseline_rows(baseline: str, eval_blocks: torch.Tensor, dtype: torch.dtype, ppl_fp: float,
                  ppl_calibrated: float) -> dict:
    """--baseline's perplexity, and the share of its gap to full precision that the calibration closed."""
    import peft_lota

    ppl = perplexity(peft_lota.load_model(baseline, dtype=dtype), eval_blocks)
    gap = ppl - ppl_fp
    return {"ppl_baseline": ppl, "baseline_gap_closed": round((ppl - ppl_calibrated) / gap, 3) if gap > 0 else None}


def main(argv=None) -> dict:
    """Calibrate, merge, save, reload and compare; prints and writes (calibration_summary.json) the summary."""
    args = parse_args(argv)

    # peft_lota before transformers: it sets gptqmodel's worker count before anything can import gptqmodel
    import peft_lota
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t_start = time.time()
    dtype = getattr(torch, args.dtype)
    tok = AutoTokenizer.from_pretrained(args.model_name_or_path)
    calib_texts, eval_texts = load_texts(args)
    windows = token_windows(tok, calib_texts, args.samples, args.seq_len, args.seed)
    batches = list(windows.split(args.batch_size))
    eval_blocks = token_windows(tok, eval_texts, 256, args.seq_len, seed=1) if eval_texts else None
    model = AutoModelForCausalLM.from_pretrained(args.model_name_or_path, dtype=dtype)
    summary = {"bits": args.bits, "group_size": args.group_size, "sym": args.sym, "saliency": args.saliency,
               "samples": len(windows), "seq_len": args.seq_len, "epochs": args.epochs}
    if eval_blocks is not None:
        summary["ppl_fp"] = perplexity(model, eval_blocks)
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
        summary["ppl_calibrated"] = perplexity(reloaded, eval_blocks)
        if args.baseline:
            summary.update(baseline_rows(args.baseline, eval_blocks, dtype, summary["ppl_fp"],
                                         summary["ppl_calibrated"]))
    summary["total_seconds"] = round(time.time() - t_start, 1)
    (out / "calibration_summary.json").write_text(json.dumps(summary, indent=1))
    for key, value in summary.items():
        print(f"{key:28s} {value:.3f}" if isinstance(value, float) else f"{key:28s} {value}")
    return summary


if __name__ == "__main__":
    main()
