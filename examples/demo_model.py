"""Build the small GPTQ base models used by the demo and the benchmarks, fully offline.

The corpus, the tokenizer and the model are all made on the spot, so nothing is downloaded.

Corpus
    The Python standard library's own source, ``os.path.dirname(os.__file__)``: real text
    (code, comments, docstrings) present on every CPython install and under the PSF license,
    so it is license-clean to train on and to ship derived artefacts. We drop ``site-packages``
    (third-party code), test suites (``test``/``tests`` dirs; a preset may add them to the
    train split only, see ``include_tests``) and generated or non-library files (``encodings``
    charmap tables, ``pydoc_data``, ``idlelib``, ``lib2to3``, ``turtledemo``). Files are split
    deterministically BY FILE, by a hash of their relative path, 80/10/10 into ``train``
    (pretraining, tokenizer, GPTQ calibration), ``finetune`` (held-in data for adapter
    training) and ``eval`` (held-out perplexity). The text depends on the CPython version, so
    only compare numbers made with the same interpreter.

Why the model looks like this
    A small, briefly trained model barely suffers from GPTQ: its function lives in the
    unquantized embedding/head and in layer weights still close to their random start. To make
    the quantized layers matter we use a small vocabulary (1024), tied embeddings (one small
    unquantized matrix instead of two), a small initialisation scale (0.01) and a model small
    enough to see many training tokens per parameter within the time budget.

Usage
    python examples/demo_model.py [--preset demo] [--root demo_out] [--bits 4 3 2]
builds (or reuses, everything is cached under ``root/preset``) the full-precision model and
its GPTQ versions, and prints a perplexity table.
"""
from __future__ import annotations

import argparse
import functools
import hashlib
import json
import math
import os
import time
from pathlib import Path

os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")  # gptqmodel fails on 2-core machines without it

import torch
from tqdm.auto import tqdm

SEED = 0

# ----------------------------------------------------------------------------- presets
_COMMON = dict(vocab_size=1024, tie_word_embeddings=True, initializer_range=0.01, seq_len=128,
               weight_decay=0.1, calib_samples=128, calib_len=256, include_tests=False)
PRESETS: dict[str, dict] = {
    # CPU, 2 cores: ~0.19 s/step on idle cores, so pretraining takes ~5 min and quantizing to
    # 4/3/2 bits plus evaluating ~1 min. Hidden 128 / 0.85M layer parameters is about the
    # compute-optimal size for this budget (~3.6 tokens per layer parameter here), which is what
    # makes the quantized layers matter. Sizes are multiples of 128: every group is full (g128
    # is a whole row for the attention and gate/up projections, 3 groups for down_proj).
    "demo": dict(_COMMON, hidden_size=128, intermediate_size=384, num_hidden_layers=4,
                 num_attention_heads=4, batch_size=16, steps=1500, lr=5e-3, warmup=75,
                 group_size=128, eval_blocks=256),
    # CPU, longer (~15 min pretraining, ~0.31 s/step): the benchmark's base model. g64: 192 is
    # not a multiple of 128.
    "bench-cpu": dict(_COMMON, hidden_size=192, intermediate_size=512, num_hidden_layers=4,
                      num_attention_heads=4, batch_size=16, steps=2800, lr=4e-3, warmup=140,
                      group_size=64, eval_blocks=512),
    # A second base model for the accuracy benchmark's pilots, so that a default is not tuned to one model:
    # wider and shallower than "demo", with 64-wide groups and 64-dim heads; ~0.2 s/step on 2 cores (~5 min).
    "alt": dict(_COMMON, hidden_size=192, intermediate_size=512, num_hidden_layers=3,
                num_attention_heads=3, batch_size=16, steps=1500, lr=4e-3, warmup=75,
                group_size=64, eval_blocks=256),
    # One GPU (untested here): ~10M layer parameters; the test files join the train split
    # (only it) so that ~41M training tokens are ~4 epochs rather than ~15.
    "gpu": dict(_COMMON, hidden_size=384, intermediate_size=1024, num_hidden_layers=6,
                num_attention_heads=6, seq_len=256, batch_size=32, steps=5000, lr=2e-3,
                warmup=250, group_size=128, eval_blocks=512, calib_samples=256,
                include_tests=True),
}


def get_preset(preset: str | dict, **overrides) -> dict:
    p = dict(PRESETS[preset] if isinstance(preset, str) else preset)
    p.update(overrides)
    return p


# ----------------------------------------------------------------------------- corpus
_SKIP_DIRS = {"site-packages", "dist-packages", "encodings", "pydoc_data", "idlelib", "lib2to3",
              "turtledemo", "__pycache__"}
_TEST_DIRS = {"test", "tests", "idle_test"}
SPLITS = ("train", "finetune", "eval")


def stdlib_root() -> Path:
    return Path(os.path.dirname(os.__file__))


def split_of(relpath: str) -> str:
    """80/10/10 by a hash of the path: stable across machines, file order and added files."""
    h = int(hashlib.sha1(relpath.encode()).hexdigest(), 16) % 100
    return "train" if h < 80 else "finetune" if h < 90 else "eval"


def corpus_files(split: str, include_tests: bool = False) -> list[Path]:
    """Sorted stdlib ``*.py`` files of ``split``; ``include_tests`` adds all test files to train."""
    assert split in SPLITS, split
    root, out = stdlib_root(), []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS)
        rel_dir = Path(dirpath).relative_to(root)
        is_test = any(part in _TEST_DIRS for part in rel_dir.parts)
        for f in sorted(filenames):
            if not f.endswith(".py"):
                continue
            rel = (rel_dir / f).as_posix()
            if (split == "train" and include_tests) if is_test else split_of(rel) == split:
                out.append(root / rel)
    return out


def corpus_texts(split: str, include_tests: bool = False) -> list[str]:
    return [p.read_text(encoding="utf-8", errors="replace") for p in corpus_files(split, include_tests)]


# ----------------------------------------------------------------------------- tokenizer
def train_tokenizer(out_dir: str | os.PathLike, vocab_size: int = 1024, include_tests: bool = False):
    """Byte-level BPE trained on the train split, saved as a PreTrainedTokenizerFast (cached)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    out_dir = Path(out_dir)
    if (out_dir / "tokenizer.json").exists():
        return PreTrainedTokenizerFast.from_pretrained(out_dir)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)  # no unknown bytes, ever
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(corpus_texts("train", include_tests), trainer=trainer)
    eos = "<|endoftext|>"  # one special token serves as eos/bos/pad
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=eos, bos_token=eos, pad_token=eos)
    fast.save_pretrained(out_dir)
    return fast


def split_tokens(tokenizer, split: str, cache_dir: str | os.PathLike | None = None,
                 include_tests: bool = False) -> torch.Tensor:
    """The split's files tokenized and concatenated (EOS after each) into one 1-D stream.

    Files come in sorted order, so the stream is deterministic. It is cached as
    ``{split}_tokens.pt`` in ``cache_dir`` (tokenizing the train split takes ~15 s on 2 cores).
    """
    cache = Path(cache_dir) / f"{split}_tokens.pt" if cache_dir is not None else None
    if cache is not None and cache.exists():
        return torch.load(cache).long()
    ids: list[int] = []
    texts = corpus_texts(split, include_tests)
    for doc in tokenizer(texts, add_special_tokens=False)["input_ids"]:  # batched: runs in parallel
        ids += doc + [tokenizer.eos_token_id]
    stream = torch.tensor(ids, dtype=torch.long)
    if cache is not None:
        torch.save(stream.to(torch.int16 if len(tokenizer) < 2**15 else torch.int32), cache)
    return stream


def token_blocks(tokenizer, split: str, seq_len: int, max_blocks: int | None = None,
                 cache_dir: str | os.PathLike | None = None, include_tests: bool = False) -> torch.Tensor:
    """The split's token stream cut into [n, seq_len] blocks (packed: no padding is wasted)."""
    stream = split_tokens(tokenizer, split, cache_dir, include_tests)
    n = len(stream) // seq_len if max_blocks is None else min(len(stream) // seq_len, max_blocks)
    return stream[: n * seq_len].view(n, seq_len)


def eval_blocks(model_dir: str | os.PathLike, preset: str | dict = "demo", split: str = "eval") -> torch.Tensor:
    """The fixed blocks for ``perplexity``: ``eval_blocks`` blocks spread evenly over the split,
    so that every part of the split (not just its first few files) is represented."""
    from transformers import AutoTokenizer

    p = get_preset(preset)
    tok = AutoTokenizer.from_pretrained(model_dir)
    blocks = token_blocks(tok, split, p["seq_len"], cache_dir=model_dir)
    return blocks[torch.linspace(0, len(blocks) - 1, min(p["eval_blocks"], len(blocks))).long()]


def finetune_blocks(model_dir: str | os.PathLike, preset: str | dict = "demo") -> torch.Tensor:
    """All [n, seq_len] blocks of the held-in ``finetune`` split (files unseen in pretraining)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    return token_blocks(tok, "finetune", get_preset(preset)["seq_len"], cache_dir=model_dir)


def pilot_blocks(model_dir: str | os.PathLike, preset: str | dict = "demo") -> tuple[torch.Tensor, torch.Tensor]:
    """The ``finetune`` split cut for a hyper-parameter pilot: (training blocks, validation blocks).

    One file in ten, chosen by a second hash of its path (so from every part of the library, not the
    alphabetical tail), is held out for validation; each part is tokenized and packed on its own.
    """
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    seq_len = get_preset(preset)["seq_len"]
    root, out = stdlib_root(), []
    for part in ("train", "val"):
        cache = Path(model_dir) / f"finetune-pilot-{part}_tokens.pt"
        if cache.exists():
            stream = torch.load(cache).long()
        else:
            files = [f for f in corpus_files("finetune")
                     if (int(hashlib.sha1(b"pilot/" + f.relative_to(root).as_posix().encode()).hexdigest(), 16) % 10 == 0)
                     == (part == "val")]
            texts = [f.read_text(encoding="utf-8", errors="replace") for f in files]
            ids: list[int] = []
            for doc in tok(texts, add_special_tokens=False)["input_ids"]:
                ids += doc + [tok.eos_token_id]
            stream = torch.tensor(ids, dtype=torch.long)
            torch.save(stream.to(torch.int16 if len(tok) < 2**15 else torch.int32), cache)
        n = len(stream) // seq_len
        out.append(stream[: n * seq_len].view(n, seq_len))
    return out[0], out[1]


# ----------------------------------------------------------------------------- model
def build_config(preset: str | dict, tokenizer=None):
    from transformers import LlamaConfig

    p = get_preset(preset)
    eos = tokenizer.eos_token_id if tokenizer is not None else 0
    return LlamaConfig(
        vocab_size=p["vocab_size"], hidden_size=p["hidden_size"],
        intermediate_size=p["intermediate_size"], num_hidden_layers=p["num_hidden_layers"],
        num_attention_heads=p["num_attention_heads"], num_key_value_heads=p["num_attention_heads"],
        max_position_embeddings=max(512, p["seq_len"]), initializer_range=p["initializer_range"],
        tie_word_embeddings=p["tie_word_embeddings"], bos_token_id=eos, eos_token_id=eos,
        pad_token_id=eos,
    )


def _done(d: Path) -> bool:
    return (d / "DONE").exists()


def _lr_factor(step: int, warmup: int, steps: int) -> float:
    """Linear warmup, then cosine decay to 10% of the peak."""
    if step < warmup:
        return (step + 1) / warmup
    t = (step - warmup) / max(1, steps - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t))


def _pinned_threads(fn):
    """Run fn with `threads=` torch threads (default: every core), then restore the caller's count.

    The base models are built with the machine's core count whoever calls, so that the demo and the
    benchmark build the same model (float reductions depend on the thread count).
    """
    @functools.wraps(fn)
    def wrapper(*args, threads: int | None = None, **kwargs):
        before = torch.get_num_threads()
        torch.set_num_threads(threads or os.cpu_count() or 1)
        try:
            return fn(*args, **kwargs)
        finally:
            torch.set_num_threads(before)
    return wrapper


@_pinned_threads
def pretrain(preset: str | dict, out_dir: str | os.PathLike, **overrides) -> Path:
    """Pretrain a preset from scratch with a plain PyTorch loop; skipped if ``out_dir/DONE`` exists.

    ``out_dir`` receives the model (save_pretrained), the tokenizer, the cached token streams
    and ``train_log.json`` (time, tokens, parameter counts, final loss).
    """
    from transformers import LlamaForCausalLM

    p, out_dir = get_preset(preset, **overrides), Path(out_dir)
    if _done(out_dir):
        return out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(SEED)
    device = "cuda" if torch.cuda.is_available() else "cpu"

    t0 = time.time()
    tok = train_tokenizer(out_dir, p["vocab_size"], p["include_tests"])
    # seq_len + 1 tokens per row: inputs and their shifted labels.
    data = token_blocks(tok, "train", p["seq_len"] + 1, cache_dir=out_dir, include_tests=p["include_tests"])
    model = LlamaForCausalLM(build_config(p, tok)).to(device)
    # Decay matrices only (not norms).
    decay = [q for q in model.parameters() if q.dim() >= 2]
    no_decay = [q for q in model.parameters() if q.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": p["weight_decay"]},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=p["lr"], betas=(0.9, 0.95), fused=device == "cuda")
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_factor(s, p["warmup"], p["steps"]))
    gen = torch.Generator().manual_seed(SEED)
    order, bs = torch.randperm(len(data), generator=gen), p["batch_size"]
    model.train()
    losses, bar = [], tqdm(range(p["steps"]), desc=f"pretrain {p['hidden_size']}x{p['num_hidden_layers']}",
                           mininterval=2)
    for step in bar:
        i = (step * bs) % len(data)
        if step and i < bs:  # wrapped around: new epoch, new order
            order = torch.randperm(len(data), generator=gen)
        batch = data[order[torch.arange(i, i + bs) % len(data)]].to(device)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device == "cuda"):
            logits = model(input_ids=batch[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), batch[:, 1:].flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if step % 20 == 0:
            bar.set_postfix(loss=f"{sum(losses[-20:]) / len(losses[-20:]):.3f}")
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    n_emb = model.get_input_embeddings().weight.numel()
    log = dict(preset=p, seconds=round(time.time() - t0, 1), steps=p["steps"],
               tokens=p["steps"] * bs * p["seq_len"], train_tokens_available=data.numel(),
               params=sum(q.numel() for q in model.parameters()),  # tied weights counted once
               layer_params=sum(q.numel() for n, q in model.named_parameters() if ".layers." in n),
               embedding_params=n_emb, final_loss=round(sum(losses[-50:]) / len(losses[-50:]), 4))
    (out_dir / "train_log.json").write_text(json.dumps(log, indent=1))
    (out_dir / "DONE").touch()
    return out_dir


# ----------------------------------------------------------------------------- GPTQ
@_pinned_threads
def quantize(fp_dir, out_dir, bits: int, group_size: int = 128, sym: bool = False,
             desc_act: bool = False, calib_samples: int = 128, calib_len: int = 256) -> Path:
    """GPTQ-quantize ``fp_dir`` via transformers' GPTQConfig into ``out_dir`` (cached, DONE marker).

    Calibration: ``calib_samples`` random ``calib_len``-token windows of the train split.
    The checkpoint is written as transformers writes a fresh quantization (``gptq_v2``).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer, GPTQConfig

    out_dir = Path(out_dir)
    if _done(out_dir):
        return out_dir
    tok = AutoTokenizer.from_pretrained(fp_dir)
    blocks = token_blocks(tok, "train", calib_len, cache_dir=fp_dir)
    pick = torch.randperm(len(blocks), generator=torch.Generator().manual_seed(SEED))[:calib_samples]
    calib = [tok.decode(blocks[i]) for i in pick.tolist()]
    qcfg = GPTQConfig(bits=bits, group_size=group_size, sym=sym, desc_act=desc_act,
                      # GPTQ refuses group_size=-1 with group-aware reordering (GAR); GAR only
                      # changes the processing order, groups stay contiguous (trivial g_idx).
                      act_group_aware=group_size != -1 and not desc_act,
                      dataset=calib, tokenizer=tok, model_seqlen=calib_len)
    t0 = time.time()
    model = AutoModelForCausalLM.from_pretrained(
        fp_dir, quantization_config=qcfg, dtype=torch.float16 if torch.cuda.is_available() else torch.float32)
    secs = time.time() - t0
    model.config.quantization_config.dataset = None  # else config.json carries the calibration text
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    log = dict(bits=bits, group_size=group_size, sym=sym, desc_act=desc_act, seconds=round(secs, 1))
    (out_dir / "quant_log.json").write_text(json.dumps(log, indent=1))
    (out_dir / "DONE").touch()
    return out_dir


def load_gptq(q_dir, backend: str = "gptq_torch", **kwargs):
    """Load a GPTQ checkpoint with a given kernel (default: TorchLinear, standard layout, trainable)."""
    from transformers import AutoModelForCausalLM, GPTQConfig

    bits = json.loads((Path(q_dir) / "config.json").read_text())["quantization_config"]["bits"]
    kwargs.setdefault("dtype", torch.float32 if not torch.cuda.is_available() else torch.float16)
    return AutoModelForCausalLM.from_pretrained(
        q_dir, quantization_config=GPTQConfig(bits=bits, backend=backend), **kwargs)


@torch.no_grad()
def perplexity(model, blocks: torch.Tensor, batch_size: int = 16) -> float:
    """Token perplexity of ``model`` on ``blocks`` [n, seq_len], each block scored on its own."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    nll, count = 0.0, 0
    # gptqmodel torch.compiles TorchLinear's dequantization; compiling costs more than it saves here.
    with torch.compiler.set_stance("force_eager"):
        for i in range(0, len(blocks), batch_size):
            b = blocks[i : i + batch_size].to(device)
            logits = model(input_ids=b).logits[:, :-1].float()
            nll += torch.nn.functional.cross_entropy(logits.flatten(0, 1), b[:, 1:].flatten(),
                                                     reduction="sum").item()
            count += b[:, 1:].numel()
    model.train(was_training)
    return math.exp(nll / count)


# ----------------------------------------------------------------------------- pipeline
def quant_name(bits: int, group_size: int, sym: bool = False) -> str:
    return f"gptq-{bits}bit-g{group_size if group_size > 0 else 'row'}{'-sym' if sym else ''}"


def build(preset: str = "demo", root: str | os.PathLike = "demo_out", bits=(2,),
          group_size: int | None = None, sym: bool = False) -> dict:
    """Pretrain (cached) and GPTQ-quantize (cached) a preset; returns the directories.

    ``{"fp": root/preset/fp, 2: root/preset/gptq-2bit-g128, ...}``; group size: the preset's.
    """
    p = get_preset(preset)
    base = Path(root) / (preset if isinstance(preset, str) else "custom")
    dirs = {"fp": pretrain(p, base / "fp")}
    gs = p["group_size"] if group_size is None else group_size
    for b in bits:
        dirs[b] = quantize(dirs["fp"], base / quant_name(b, gs, sym), b, gs, sym,
                           calib_samples=p["calib_samples"], calib_len=p["calib_len"])
    return dirs


def evaluate(preset: str = "demo", root: str | os.PathLike = "demo_out", bits=(4, 3, 2),
             group_size: int | None = None, sym: bool = False) -> dict:
    """Build everything, measure held-out perplexities (cached in results.json), return a summary."""
    from transformers import AutoModelForCausalLM

    dirs = build(preset, root, bits, group_size, sym)
    fp = dirs["fp"]
    cache_file = fp.parent / "results.json"
    cache = json.loads(cache_file.read_text()) if cache_file.exists() else {}
    blocks = eval_blocks(fp, preset)

    def ppl(key, load):
        if key not in cache:
            t0 = time.time()
            cache[key] = dict(ppl=perplexity(load(), blocks), eval_seconds=round(time.time() - t0, 1))
            cache_file.write_text(json.dumps(cache, indent=1))
        return cache[key]["ppl"]

    train_log = json.loads((fp / "train_log.json").read_text())
    out = dict(preset=preset, params=train_log["params"], layer_params=train_log["layer_params"],
               steps=train_log["steps"], tokens=train_log["tokens"], pretrain_s=train_log["seconds"],
               fp_ppl=ppl("fp", lambda: AutoModelForCausalLM.from_pretrained(fp, dtype=torch.float32)),
               gptq={})
    for b in bits:
        qlog = json.loads((dirs[b] / "quant_log.json").read_text())
        out["gptq"][b] = dict(group_size=qlog["group_size"], quantize_s=qlog["seconds"],
                              ppl=ppl(dirs[b].name, lambda: load_gptq(dirs[b])))
    return out


def format_table(rows: list[dict]) -> str:
    bits = sorted({b for r in rows for b in r["gptq"]}, reverse=True)
    head = ["preset", "params (layers)", "steps", "tokens", "pretrain s", "fp ppl"]
    head += [f"{b}-bit ppl (g, +%)" for b in bits] + ["quantize s"]
    lines = [" | ".join(head), " | ".join("---" for _ in head)]
    for r in rows:
        cells = [r["preset"], f"{r['params'] / 1e6:.2f}M ({r['layer_params'] / 1e6:.2f}M)", str(r["steps"]),
                 f"{r['tokens'] / 1e6:.2f}M", f"{r['pretrain_s']:.0f}", f"{r['fp_ppl']:.2f}"]
        for b in bits:
            q = r["gptq"].get(b)
            cells.append("-" if q is None else
                         f"{q['ppl']:.2f} (g{q['group_size'] if q['group_size'] > 0 else 'row'}, {100 * (q['ppl'] / r['fp_ppl'] - 1):+.1f}%)")
        cells.append(" / ".join(f"{r['gptq'][b]['quantize_s']:.0f}" for b in bits if b in r["gptq"]))
        lines.append(" | ".join(cells))
    return "\n".join(lines)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="demo", choices=sorted(PRESETS))
    ap.add_argument("--root", default="demo_out", help="cache directory (re-runs reuse it)")
    ap.add_argument("--bits", type=int, nargs="+", default=[4, 3, 2])
    ap.add_argument("--group-size", type=int, default=None, help="default: the preset's")
    ap.add_argument("--sym", action="store_true")
    args = ap.parse_args()
    t0 = time.time()
    row = evaluate(args.preset, args.root, tuple(args.bits), args.group_size, args.sym)
    print(format_table([row]))
    print(f"total {time.time() - t0:.0f} s (cached steps take no time)")
