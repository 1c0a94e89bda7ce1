"""What every peft_lota method's tuner layer shares: the base it wraps, the forward guard, and exact merges.

A method's layer subclasses `QuantLayer` and keeps its maths: how it initialises an adapter (`update_layer`), what
its adapted forward computes (`adapted_forward`) and what a merge writes (`merge`). The base handles the rest
the same way for every method:

- the quantized base is read and written only through its `QuantWeights` (formats/), or is a full-precision
  `nn.Linear` that a merge replaces by a quantized layer it builds (`merged_layer`);
- a merge swaps new packed buffers in (`write_merged`) after keeping aliases of the old ones, so `unmerge` restores
  them exactly, and `safe_merge` decodes the bytes about to be written first (`check_encoded`);
- a merged adapter cannot train (its update lives in the integer codes), and disabling adapters unmerges.
"""

from __future__ import annotations

import logging
import zlib
from typing import Optional

import torch
from torch import nn
from peft.tuners.tuners_utils import BaseTunerLayer

from .formats.base import QuantState, QuantWeights
from .guards import check_rank
from .tuner import merged_training_error

logger = logging.getLogger(__name__)


class RoundToStoredSTE(torch.autograd.Function):
    """A float32 tensor rounded to the dtype a checkpoint stores (fp16 scales), kept in float32; STE gradient.

    Trained scales pass through it in every forward, so the model that trains uses exactly the scales a merge
    writes."""

    @staticmethod
    def forward(ctx, t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return t.to(dtype).float()

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class QuantLayer(nn.Module, BaseTunerLayer):
    """A PEFT tuner layer on a quantized layer (or on an nn.Linear a merge quantizes)."""

    method_title: str = "?"  # how messages name the method ("LoTA")
    config_name: str = "?"  # its config class, as messages name it ("LotaConfig")

    def __init__(self, base_layer: nn.Module, quant: Optional[QuantWeights], adapter_name: str,
                 current_key: str = "") -> None:
        super().__init__()
        self.base_layer = base_layer
        self.quant = quant  # how the base's codes are read and written (formats/); None for an nn.Linear base
        self._disable_adapters = False
        self.merged_adapters: list[str] = []
        self._unmerged_snapshot: Optional[dict[str, torch.Tensor]] = None  # raw buffers before the first merge
        self.merged_layer: Optional[nn.Module] = None  # nn.Linear base: the quantized layer a merge built
        self.in_features = base_layer.in_features
        self.out_features = base_layer.out_features
        self._current_key = current_key
        self._active_adapter = adapter_name

    # ---- adapters ----------------------------------------------------------------------------
    def _new_adapter(self, adapter_name: str, r: int, init_seed: Optional[int]) -> Optional[torch.Generator]:
        """Checks a new adapter's rank; returns its initialisation's generator: one reproducible stream per layer and
        adapter, independent of the order layers are created in (None: torch's global one)."""
        check_rank(self, r, self.config_name)
        if init_seed is None:
            return None
        return torch.Generator().manual_seed(init_seed + zlib.crc32(f"{self._current_key}/{adapter_name}".encode()))

    def _unmerged_active(self) -> list[str]:
        trained = getattr(self, self.adapter_layer_names[0])
        return [a for a in self.active_adapters if a in trained and a not in self.merged_adapters]

    # ---- forward -----------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if self.merged and self.training and torch.is_grad_enabled():
            raise merged_training_error(self.method_title, self._current_key)
        if self.merged_layer is not None:
            return self.merged_layer(x)
        active = self._unmerged_active()
        if not active:
            return self.base_layer(x, *args, **kwargs)
        return self.adapted_forward(x, active)

    def adapted_forward(self, x: torch.Tensor, active: list[str]) -> torch.Tensor:
        """The layer's output with these (unmerged, active) adapters: the method's maths."""
        raise NotImplementedError

    # ---- merge -------------------------------------------------------------------------------
    def base_state(self) -> QuantState:
        """The base's codes without any merged adapter."""
        if self._unmerged_snapshot is None:
            return self.quant.read()
        current = self.quant.snapshot()
        self.quant.restore(self._unmerged_snapshot)
        try:
            return self.quant.read()
        finally:
            self.quant.restore(current)

    def check_encoded(self, buffers: dict, codes: torch.Tensor, zeros: Optional[torch.Tensor],
                      scales: torch.Tensor, offsets: Optional[torch.Tensor] = None) -> None:
        """safe_merge: decode the exact bytes about to be written and compare, before writing anything."""
        current = self.quant.snapshot()
        self.quant.restore(buffers)
        try:  # compared before restoring: the state aliases the layer's buffers
            written = self.quant.read()
            same = (torch.equal(written.codes, codes) and torch.equal(written.scales, scales)
                    and (zeros is None or torch.equal(written.zeros.to(torch.int32), zeros.to(torch.int32)))
                    and (offsets is None or torch.equal(written.offsets, offsets)))
        finally:
            self.quant.restore(current)
        if not same:
            raise ValueError(f"safe_merge: the packed merge of {self._current_key or 'a layer'} does not decode to "
                             "the codes and scales it should hold; nothing was written.")

    def write_merged(self, buffers: dict) -> None:
        """Swap the merged buffers in, keeping aliases of the unmerged ones (from before the first merge)."""
        if self._unmerged_snapshot is None:
            self._unmerged_snapshot = self.quant.snapshot()
        self.quant.restore(buffers)

    def release_unmerged(self) -> None:
        """Forget the pre-merge buffers (merge_and_unload: no unmerge follows, so they are freed now)."""
        self._unmerged_snapshot = None

    def unmerge(self) -> None:
        if not self.merged:
            logger.warning("Already unmerged. Nothing to do.")
            return
        if self._unmerged_snapshot is not None:
            self.quant.restore(self._unmerged_snapshot)
            self._unmerged_snapshot = None
        self.merged_layer = None
        self.merged_adapters = []

    def __repr__(self) -> str:
        return self.prefix_name + "." + super().__repr__()

    @property
    def prefix_name(self) -> str:
        return self.adapter_layer_names[0].split("_", 1)[0]


def codes_moved(model: nn.Module) -> Optional[tuple[int, int]]:
    """(codes its active adapters move, codes of the adapted layers) over a model's quantized tuner layers, or None
    where none has a quantized base (a full-precision start: every code will be new)."""
    deltas = [d for m in model.modules() if isinstance(m, QuantLayer)
              for d in [m.get_delta_codes(m.active_adapters[0])] if d is not None]
    if not deltas:
        return None
    return sum(int((d != 0).sum()) for d in deltas), sum(d.numel() for d in deltas)
