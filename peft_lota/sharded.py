"""Training sharded with FSDP2 (`fully_shard`, what accelerate's FSDP2 plugin applies): the adapter gathered whole.

FSDP2 shards every parameter, adapter included, into DTensors; the packed integer codes are buffers and stay whole
on every rank. Merging needs the adapter whole: every rank calls `gather_adapter` (a collective, one tensor at a
time, adapter tensors only), the main process loads the result into an unsharded copy of the model built the same
way (`load_adapter`) and merges, evaluates or saves that copy as in a single-process run.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["is_sharded", "gather_adapter", "load_adapter"]


def is_sharded(model: nn.Module) -> bool:
    """Whether FSDP2 shards `model`'s parameters (DTensors)."""
    if not torch.distributed.is_available():  # a torch built without it cannot shard
        return False
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def gather_adapter(model: nn.Module, rank0_only: bool = True) -> dict[str, torch.Tensor]:
    """The trainable tensors of a model sharded by FSDP2, whole and on the CPU, by parameter name.

    Every rank must call it, in step (one all-gather per tensor). With `rank0_only`, ranks other than 0 get {}.
    """
    from torch.distributed.tensor import DTensor

    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    out = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        whole = p.full_tensor() if isinstance(p, DTensor) else p.detach()
        if rank == 0 or not rank0_only:
            out[name] = whole.cpu().clone()
    return out


@torch.no_grad()
def load_adapter(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy `gather_adapter`'s tensors into an unsharded model with the same adapter (same names and shapes)."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if params.keys() != state.keys():
        missing, extra = sorted(params.keys() - state.keys()), sorted(state.keys() - params.keys())
        raise ValueError(f"the gathered adapter does not fit this model: missing {missing[:3]}, unexpected "
                         f"{extra[:3]}. Build the model with the same base and adapter config as the sharded one.")
    for name, p in params.items():
        if p.shape != state[name].shape or p.dtype != state[name].dtype:  # a cast would round a trained tensor
            raise ValueError(f"{name}: gathered {tuple(state[name].shape)} {state[name].dtype}, this model's "
                             f"{tuple(p.shape)} {p.dtype}: build the copy with the sharded model's dtype.")
        p.copy_(state[name])
