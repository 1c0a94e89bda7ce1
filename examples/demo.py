"""The toy demo, on one CPU, offline, in minutes: `make demo-tiny` runs this (`make demo` runs demo_real.py).

1. Pretrain a small Llama on the Python standard library's own source (examples/demo_model.py; the
   text ships with every CPython, so nothing is downloaded) and GPTQ-quantize it to 2 bits, where
   its perplexity visibly suffers. Both are cached under --root.
2. Fine-tune the GPTQ model with LoTA, and with L4Q, through a stock transformers.Trainer and its own
   AdamW (peft_lota/scripts/finetune.py, i.e. `peft-lota finetune`), on held-in stdlib files that
   pretraining never saw.
3. Merge each adapter exactly, save a standard GPTQ checkpoint, reload it with stock transformers,
   and check that it reproduces the merged model exactly.
4. Print held-out perplexity (full precision, GPTQ, GPTQ + LoTA merged, GPTQ + L4Q merged), training
   times and the checks.
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

# The demo's settings. Both methods with their defaults (LoTA: LotaConfig(), r 64; L4Q: r 64, lora_alpha 64 like
# the accuracy benchmark) in the accuracy benchmark's recovery recipe: the pilot's learning rates
# (benchmarks/results/accuracy-cpu-tune.md: 1e-4 for LoTA, 3e-3 for L4Q from a GPTQ model, 2 bits), cosine decay
# after 5% warm-up, 100 steps x 16 blocks (0.8 epochs of the fine-tuning split, ~25 s each here). Longer runs
# overfit it: at 400 steps (3 epochs) L4Q's training loss fell to 2.83 while its held-out perplexity rose above
# GPTQ's (23.96 vs 23.08), and LoTA ended at 22.48 instead of 22.40.
DEMO = dict(bits=2, steps=100, batch_size=16, eval_sequences=64,
            methods={"LoTA": dict(method="lota", r=64, learning_rate=1e-4),
                     "L4Q": dict(method="l4q", r=64, lora_alpha=64, learning_rate=3e-3)})


def write_jsonl(path: Path, texts: list[str]) -> Path:
    if not path.exists():
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
        tmp.rename(path)
    return path


def finetune_args(q_dir: Path, data: dict[str, Path], out: Path, cfg: dict, method: dict) -> list[str]:
    args = {
        "model_name_or_path": q_dir, "train_file": data["finetune"], "validation_file": data["eval"],
        "block_size": demo_model.get_preset("demo")["seq_len"], "max_eval_samples": cfg["eval_sequences"],
        "init_seed": 0, "output_dir": out, "max_steps": cfg["steps"], "per_device_train_batch_size": cfg["batch_size"],
        "per_device_eval_batch_size": 16, "lr_scheduler_type": "cosine", "warmup_steps": cfg["steps"] // 20,
        "logging_steps": 50, "save_strategy": "no", "report_to": "none", "seed": 0,
        "use_cpu": not torch.cuda.is_available(), **method,
    }
    return [x for k, v in args.items() for x in (f"--{k}", str(v))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", default="demo_out", help="cache and output folder (re-runs reuse the base models)")
    ap.add_argument("--steps", type=int, default=DEMO["steps"], help="optimizer steps of each fine-tuning run")
    ap.add_argument("--methods", nargs="+", default=list(DEMO["methods"]), choices=list(DEMO["methods"]))
    args = ap.parse_args()
    cfg = {**DEMO, "steps": args.steps}
    t_start = time.time()

    # 1. base models (cached)
    dirs = demo_model.build("demo", args.root, bits=(cfg["bits"],))
    fp_dir, q_dir = dirs["fp"], dirs[cfg["bits"]]
    data_dir = Path(args.root) / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    data = {s: write_jsonl(data_dir / f"{s}.jsonl", demo_model.corpus_texts(s)) for s in ("finetune", "eval")}

    # 2-3. fine-tune with the stock Trainer, merge, save, reload and verify
    summaries = {name: finetune.main(finetune_args(q_dir, data, Path(args.root) / name.lower(), cfg,
                                                   cfg["methods"][name]))
                 for name in args.methods}

    # 4. held-out perplexity on the fixed evaluation blocks of the eval split
    blocks = demo_model.eval_blocks(fp_dir, "demo")
    from transformers import AutoModelForCausalLM

    ppl = {"full precision": demo_model.perplexity(AutoModelForCausalLM.from_pretrained(fp_dir, dtype=torch.float32),
                                                   blocks),
           f"GPTQ {cfg['bits']}-bit": demo_model.perplexity(demo_model.load_gptq(q_dir), blocks)}
    for name, s in summaries.items():
        # Plain from_pretrained(dir): the default kernel of this machine, as any user would load it.
        ppl[f"GPTQ {cfg['bits']}-bit + {name}, merged, reloaded (default kernel)"] = demo_model.perplexity(
            AutoModelForCausalLM.from_pretrained(s["merged_dir"], dtype=torch.float32), blocks)
    rows = [(name, f"{v:.2f}") for name, v in ppl.items()]
    seq = demo_model.get_preset("demo")["seq_len"]
    for name, s in summaries.items():
        lr = cfg["methods"][name]["learning_rate"]
        rows += [
            (f"{name}: steps x batch, learning rate", f"{s['steps']} x {cfg['batch_size']} x {seq} tokens, {lr:g}"),
            (f"{name}: training time", f"{s['train_seconds']:.0f} s"),
            (f"{name}: codes changed by the merge", f"{s['codes_moved']:,} of {s['weights']:,}"),
            (f"{name}: merged logits == adapter logits", s["merged_equals_adapter"]),
            (f"{name}: reloaded checkpoint: codes, zeros, scales == merged", s["reloaded_buffers_equal"]),
            (f"{name}: reloaded checkpoint: logits == merged", s["reloaded_logits_equal"]),
        ]
    rows.append(("total time of this run", f"{time.time() - t_start:.0f} s"))
    print(f"\nDemo: exact fine-tuning of a {cfg['bits']}-bit GPTQ Llama, held-out perplexity on "
          f"{len(blocks)} x {blocks.shape[1]} tokens of stdlib files unseen in training\n")
    print("| | |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in rows))
    ok = all(s["merged_equals_adapter"] and s["reloaded_buffers_equal"] and s["reloaded_logits_equal"]
             for s in summaries.values())
    if not ok:
        sys.exit("demo: a merged checkpoint does not reproduce its adapter model exactly")


if __name__ == "__main__":
    main()
