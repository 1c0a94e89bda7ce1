"""Refusals shared by the tuner, its layers and export: non-finite tensors and impossible ranks (a leaf module: it
imports torch and nothing of peft_lota, so that every layer can import it)."""

from __future__ import annotations

import torch


class NonFiniteError(ValueError):
    """NaN or infinity in an adapter's tensors, in what a merge would write, or in a training run's loss."""


def refuse_non_finite(tensor: torch.Tensor, what: str, refused: str) -> None:
    """Raise NonFiniteError naming `what` if the floating tensor holds NaN or infinity; `refused`: e.g. "merge"."""
    if not tensor.is_floating_point() or bool(torch.isfinite(tensor).all()):
        return
    nan, inf = int(torch.isnan(tensor).sum()), int(torch.isinf(tensor).sum())
    raise NonFiniteError(
        f"{what} holds {nan} NaN and {inf} infinite values (of {tensor.numel()}): {refused} refused. The training "
        "that made it diverged (a NaN or infinite loss or gradient), or the file is corrupt: go back to a checkpoint "
        "saved before that and train on with a lower learning rate (or in bf16/fp32 rather than fp16); "
        "Trainer(callbacks=[peft_lota.NonFiniteCallback()]) stops a run at the first non-finite step.")


def refuse_non_finite_checkpoint(state_dict: dict) -> None:
    """Refuse a checkpoint about to be written if any floating tensor holds NaN or infinity (export's last guard:
    a merge checks what it writes, but not a base that held NaN already, nor a model edited after merging)."""
    for name, tensor in state_dict.items():
        if isinstance(tensor, torch.Tensor):
            refuse_non_finite(tensor, f"Checkpoint tensor {name}", "save")


def refuse_non_finite_adapters(layer, adapter_names, refused: str) -> None:
    """Refuse NaN/inf in every trained tensor (adapter_layer_names) of these adapters in a tuner layer."""
    for attr in layer.adapter_layer_names:
        tensors = getattr(layer, attr)
        for name in adapter_names:
            if name in tensors:
                refuse_non_finite(tensors[name].detach(), f"{layer._current_key}.{attr}.{name}", refused)


def check_rank(layer, r: int, method: str) -> None:
    """Refuse a rank beyond min(in_features, out_features), before its factors are allocated.

    A product B A of a larger rank is no richer (its rank is at most min(in, out)), and its factors would hold
    more values than the layer has weights: a wrong config (e.g. r = 2**24 from an edited adapter_config.json)
    is refused here, not after allocating gigabytes.
    """
    most = min(layer.in_features, layer.out_features)
    if r > most:
        raise ValueError(f"{method} r={r} is too large for layer {layer._current_key or '?'}: r must be at most "
                         f"min(in_features={layer.in_features}, out_features={layer.out_features}) = {most}. Lower r "
                         "(adapter_config.json or the config you pass), or exclude the layer.")
