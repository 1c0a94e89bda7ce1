"""Merge, save, reload, compare: the one pipeline behind every front end's promise.

`peft-lota merge` (in memory and `--stream`), `verify`, `finetune` and `calibrate` all check the same things the
same way: the merged model computes exactly what the adapter model did (`merge_checked`), and the checkpoint written
to disk, reloaded as a user would, holds the same codes, zero points and scales and gives the same logits
(`save_checked`, `reload_checked`). The tokenizer shipped with a checkpoint is chosen here, the same way on every
path (`tokenizer_files`), and written inside the checkpoint's atomic commit.
"""

from __future__ import annotations

import math
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from .paths import own_file

# What a tokenizer is saved as (fast and slow, BPE and sentencepiece, and the chat template of transformers 5).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja")


def probe_ids(model, seq: int = 32, batch: int = 2) -> torch.Tensor:
    """Fixed random token ids inside the model's vocabulary: the logits compared before and after."""
    return torch.randint(0, model.config.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(0))


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    device = next(model.parameters()).device
    with torch.no_grad():
        return model(input_ids=ids.to(device)).logits.cpu()


@torch.no_grad()
def perplexity(model, blocks: torch.Tensor, batch_size: int = 8) -> float:
    """exp(mean next-token NLL) of the model on [n, seq] token blocks, in fixed order, in float32."""
    model.eval()
    device = next(model.parameters()).device
    nll, count = 0.0, 0
    for i in range(0, len(blocks), batch_size):
        b = blocks[i:i + batch_size].to(device)
        out = model(input_ids=b).logits[:, :-1].float()
        nll += torch.nn.functional.cross_entropy(out.flatten(0, 1), b[:, 1:].flatten(), reduction="sum").item()
        count += b[:, 1:].numel()
    return math.exp(nll / max(count, 1))


def tokenizer_files(sources: Sequence) -> dict:
    """{file name: path} of the tokenizer to ship with a merged checkpoint: every tokenizer file of the first folder
    in `sources` that holds one, never a mix of two folders. Front ends pass the adapter's folder first (what the
    adapter was trained with: `peft-lota finetune` saves its tokenizer there, padding token included), then the
    base's. A file that links out of its folder is left out, with a note (paths.own_file)."""
    for folder in sources:
        if folder is None or not Path(folder).is_dir():
            continue
        present = [n for n in TOKENIZER_FILES if (Path(folder) / n).is_file()]
        if not any(n in present for n in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
            continue
        files = {}
        for name in present:
            own = own_file(Path(folder), name)
            if own is None:
                print(f"note: {Path(folder) / name} links out of its folder; not shipped with the checkpoint.",
                      file=sys.stderr)
            else:
                files[name] = own
        return files
    return {}


def tokenizer_from_object(tokenizer, workdir: Path) -> dict:
    """tokenizer_files of a loaded tokenizer, saved into `workdir` first."""
    tokenizer.save_pretrained(workdir)
    return tokenizer_files([workdir])


@dataclass
class Merged:
    """A merge checked against the adapter model it came from."""

    model: torch.nn.Module
    adapter_logits: torch.Tensor
    merged_logits: torch.Tensor
    codes_moved: Optional[tuple] = None  # (moved, total) from a quantized base; None from full precision

    @property
    def exact(self) -> bool:
        return bool(torch.equal(self.merged_logits, self.adapter_logits))


def merge_checked(model, ids: torch.Tensor, **merge_kwargs) -> Merged:
    """`merge_and_unload` on a PeftModel of peft_lota's methods, with the logits of the probe `ids` before and
    after (equal when the merge is exact) and the codes the adapter moves."""
    from .tuner_layer import codes_moved

    model.eval()
    before = logits(model, ids)
    moved = codes_moved(model)
    merged = model.merge_and_unload(**merge_kwargs)
    return Merged(merged, before, logits(merged, ids), moved)


@dataclass
class Reloaded:
    """A checkpoint written and read back: what a user loading it gets, compared with the model in memory."""

    out: Path
    model: torch.nn.Module = field(repr=False)
    same_tensors: bool  # codes, zero points, scales, g_idx, bias
    same_logits: bool
    quantization_config: Optional[dict] = None

    @property
    def ok(self) -> bool:
        return self.same_tensors and self.same_logits

    def format(self):
        from .formats import config_format

        return config_format(self.quantization_config) if self.quantization_config else None


def reload_checked(model, out, ids: torch.Tensor, expected_logits: torch.Tensor, load: Callable) -> Reloaded:
    """Load the checkpoint in `out` with `load(out)` and compare it with `model` (quantized tensors) and with
    `expected_logits` (the probe `ids`' logits)."""
    import json

    from .formats import same_quantized_tensors

    out = Path(out)
    reloaded = load(out)
    config = out / "config.json"
    qc = json.loads(config.read_text()).get("quantization_config") if config.is_file() else {"quant_method": "gguf"}
    return Reloaded(out, reloaded, same_quantized_tensors(model, reloaded),
                    bool(torch.equal(logits(reloaded, ids), expected_logits)), qc)


def save_checked(merged, out, ids: torch.Tensor, expected_logits: torch.Tensor, load: Callable, *,
                 tokenizer_from: Sequence = (), tokenizer=None) -> Reloaded:
    """Save the merged model into `out` with its tokenizer (`tokenizer_files(tokenizer_from)`, or a loaded
    `tokenizer`) in the same atomic commit, reload it with `load` and compare (reload_checked)."""
    from .formats.gguf import model_is_gguf, write_gguf

    if model_is_gguf(merged) and str(out).endswith(".gguf"):  # one GGUF file (it holds its own tokenizer)
        write_gguf(merged, out)
        return reload_checked(merged, out, ids, expected_logits, load)
    with tempfile.TemporaryDirectory() as work:
        files = tokenizer_from_object(tokenizer, Path(work)) if tokenizer is not None else tokenizer_files(tokenizer_from)
        merged.save_pretrained(out, extra_files=files)
    return reload_checked(merged, out, ids, expected_logits, load)
