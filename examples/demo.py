"""The whole LoTA-QAF job on one CPU, offline, in minutes: `make demo` runs this.

1. Pretrain a small Llama on the Python standard library's own source (examples/demo_model.py; the
   text ships with every CPython, so nothing is downloaded) and GPTQ-quantize it to 2 bits, where
   its perplexity visibly suffers. Both are cached under --root.
2. Fine-tune the GPTQ model with LoTA through a stock transformers.Trainer (examples/finetune.py), on
   held-in stdlib files that pretraining never saw.
3. Merge the ternary adapter into the integer codes, save a standard GPTQ checkpoint, reload it with
   stock transformers, and check that it reproduces the merged model exactly.
4. Print held-out perplexity (full precision, GPTQ, GPTQ + LoTA merged), training time and the checks.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

import demo_model  # noqa: E402
import finetune  # noqa: E402

# LoTA settings of the demo. omega = 16 (0.25 r, not the paper's 0.75 r): the accuracy benchmark's pilot
# (scored on held-out training files, benchmarks/results/accuracy-cpu-tune.md) found 48 moved almost no
# code in a short run and 8 moved too many. 400 steps (~3 epochs of the fine-tuning split, ~1 min here):
# 1200 steps were no better.
DEMO = dict(bits=2, r=64, omega=16, offset="none", steps=400, batch_size=16, eval_sequences=64)


def write_jsonl(path: Path, texts: list[str]) -> Path:
    if not path.exists():
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
        tmp.rename(path)
    return path


def finetune_args(q_dir: Path, data: dict[str, Path], out: Path, cfg: dict) -> list[str]:
    args = {
        "model_name_or_path": q_dir, "train_file": data["finetune"], "validation_file": data["eval"],
        "block_size": demo_model.get_preset("demo")["seq_len"], "max_eval_samples": cfg["eval_sequences"],
        "r": cfg["r"], "offset": cfg["offset"], "init_seed": 0, "output_dir": out,
        "max_steps": cfg["steps"], "per_device_train_batch_size": cfg["batch_size"],
        "per_device_eval_batch_size": 16, "lr_scheduler_type": "constant", "logging_steps": 25,
        "save_strategy": "no", "report_to": "none", "seed": 0, "use_cpu": not torch.cuda.is_available(),
    }
    if cfg["omega"] is not None:
        args["omega"] = cfg["omega"]
    return [x for k, v in args.items() for x in (f"--{k}", str(v))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", default="demo_out", help="cache and output folder (re-runs reuse the base models)")
    ap.add_argument("--steps", type=int, default=DEMO["steps"], help="LoTA optimizer steps")
    ap.add_argument("--r", type=int, default=DEMO["r"])
    ap.add_argument("--omega", type=int, default=DEMO["omega"])
    ap.add_argument("--offset", default=DEMO["offset"], choices=["none", "integer"])
    args = ap.parse_args()
    cfg = {**DEMO, "steps": args.steps, "r": args.r, "omega": args.omega, "offset": args.offset}
    t_start = time.time()

    # 1. base models (cached)
    dirs = demo_model.build("demo", args.root, bits=(cfg["bits"],))
    fp_dir, q_dir = dirs["fp"], dirs[cfg["bits"]]
    data_dir = Path(args.root) / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    data = {s: write_jsonl(data_dir / f"{s}.jsonl", demo_model.corpus_texts(s)) for s in ("finetune", "eval")}

    # 2-3. fine-tune with the stock Trainer, merge, save, reload and verify
    out = Path(args.root) / "lota"
    summary = finetune.main(finetune_args(q_dir, data, out, cfg))

    # 4. held-out perplexity on the fixed evaluation blocks of the eval split
    blocks = demo_model.eval_blocks(fp_dir, "demo")
    from transformers import AutoModelForCausalLM

    ppl = {
        "full precision": demo_model.perplexity(AutoModelForCausalLM.from_pretrained(fp_dir, dtype=torch.float32), blocks),
        f"GPTQ {cfg['bits']}-bit": demo_model.perplexity(demo_model.load_gptq(q_dir), blocks),
        f"GPTQ {cfg['bits']}-bit + LoTA, merged, reloaded (TorchLinear, as trained)": demo_model.perplexity(
            demo_model.load_gptq(summary["merged_dir"]), blocks),
        # Plain from_pretrained(dir): the default kernel of this machine, as any user would load it.
        f"GPTQ {cfg['bits']}-bit + LoTA, merged, reloaded (default kernel)": demo_model.perplexity(
            AutoModelForCausalLM.from_pretrained(summary["merged_dir"], dtype=torch.float32), blocks),
    }
    rows = [(name, f"{v:.2f}") for name, v in ppl.items()]
    rows += [
        ("LoTA steps x batch", f"{summary['steps']} x {cfg['batch_size']} x {demo_model.get_preset('demo')['seq_len']} tokens"),
        ("LoTA training time", f"{summary['train_seconds']:.0f} s"),
        ("codes moved by the merge", f"{summary['codes_moved']:,} of {summary['weights']:,}"),
        ("merge time", f"{summary['merge_seconds']:.2f} s"),
        ("merged logits == adapter logits", summary["merged_equals_adapter"]),
        ("reloaded checkpoint: codes, zeros, scales == merged", summary["reloaded_buffers_equal"]),
        ("reloaded checkpoint: logits == merged", summary["reloaded_logits_equal"]),
        ("total time of this run", f"{time.time() - t_start:.0f} s"),
    ]
    print(f"\nDemo: LoTA-QAF on a {cfg['bits']}-bit GPTQ Llama, held-out perplexity on "
          f"{len(blocks)} x {blocks.shape[1]} tokens of stdlib files unseen in training\n")
    print("| | |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in rows))
    ok = summary["merged_equals_adapter"] and summary["reloaded_buffers_equal"] and summary["reloaded_logits_equal"]
    if not ok:
        sys.exit("demo: the merged checkpoint does not reproduce the adapter model exactly")


if __name__ == "__main__":
    main()
