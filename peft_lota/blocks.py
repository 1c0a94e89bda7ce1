"""The decoder blocks of a causal LM, for the methods that work block by block (calibration, merge_lora): finding
them, capturing the inputs the first one receives, and checking token batches before a model is touched."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder blocks of a transformers causal LM (Llama, Qwen2, Mistral, ... : `model.layers`)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    for path in ("model.layers", "model.decoder.layers", "transformer.h", "gpt_neox.layers"):
        try:
            layers = base.get_submodule(path)
        except AttributeError:
            continue
        if isinstance(layers, nn.ModuleList):
            return layers
    raise ValueError(f"calibrate: cannot find the decoder blocks of {type(base).__name__} (looked for model.layers, "
                     "model.decoder.layers, transformer.h, gpt_neox.layers).")


class _Stop(Exception):
    pass


@torch.no_grad()
def capture_block_inputs(model: nn.Module, layers: nn.ModuleList, batches: Sequence[torch.Tensor], device):
    """[(hidden states, args, kwargs)] that the first block receives for each batch (rotary embeddings, masks, ...)."""
    store = []
    first = layers[0]

    class Catcher(nn.Module):
        def __init__(self):
            super().__init__()
            self.attention_type = getattr(first, "attention_type", None)

        def forward(self, hidden, *args, **kwargs):
            store.append((hidden.detach(), args, {k: v for k, v in kwargs.items() if k != "past_key_values"}))
            raise _Stop

    layers[0] = Catcher()
    try:
        for ids in batches:
            try:
                model(input_ids=ids.to(device), use_cache=False)
            except _Stop:
                pass
    finally:
        layers[0] = first
    return store


def check_batches(model: nn.Module, batches) -> None:
    """Refuse calibration batches the model cannot run, before the model is touched."""
    if isinstance(batches, torch.Tensor):
        raise ValueError("calibrate: batches must be a list of input_ids tensors [batch, seq], not one tensor: "
                         "pass list(ids.split(batch_size)).")
    if not batches:
        raise ValueError("calibrate: no calibration batches; pass a list of input_ids tensors [batch, seq].")
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    vocab = getattr(embeddings, "num_embeddings", None)
    for i, ids in enumerate(batches):
        what = f"calibrate: batch {i}"
        if not isinstance(ids, torch.Tensor) or ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
            kind = ids.dtype if isinstance(ids, torch.Tensor) else type(ids).__name__
            raise ValueError(f"{what} is a {kind}; pass token ids: integer tensors [batch, seq] (a tokenizer's "
                             "input_ids, return_tensors='pt').")
        if ids.dim() != 2 or ids.numel() == 0:
            raise ValueError(f"{what} has shape {tuple(ids.shape)}; pass non-empty input_ids of shape [batch, seq] "
                             "(one sequence: ids[None]).")
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or (vocab is not None and hi >= vocab):
            raise ValueError(f"{what} holds token ids {lo}..{hi}, outside this model's vocabulary "
                             f"0..{'' if vocab is None else vocab - 1}: tokenize with the model's own tokenizer.")
