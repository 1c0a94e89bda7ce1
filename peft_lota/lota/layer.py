"""The LoTA tuner layer: ternary A, B on top of an integer-coded (quantized) base layer.

Format-agnostic: the layer reads and writes its base layer's codes only through a `QuantWeights`
(formats/), which knows how they are stored. Forward, merge, unmerge and deltas are written once
here, on top of the pure functions of ternary.py.
"""

from __future__ import annotations

import logging
import zlib
from typing import Optional

import torch
from torch import nn
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge

from ..formats.base import QuantState, QuantWeights, dequantize
from .ternary import adapt_codes, apply_adapters, effective_weight, init_ternary_A, lota_linear

logger = logging.getLogger(__name__)


class FloatOffsetMergeError(ValueError):
    """Raised when asked to merge an offset="float" adapter without opting in to rounding."""


def float_offset_merge_message(adapter_name: str) -> str:
    return (
        f"LoTA adapter {adapter_name!r} was trained with offset='float'. Its offset mu is a fraction of a "
        "quantization step per group and output column, while a GPTQ checkpoint stores integer zero points, so "
        "it cannot be merged without changing the model. Alternatives: (1) keep it unmerged and run the "
        "PeftModel; (2) train with LotaConfig(offset='integer') (exactly mergeable) or offset='none'; "
        "(3) pass round_float_offset=True to merge mu rounded to the nearest integer zero-point shift "
        "(the largest weight change is reported)."
    )


class LotaLayer(nn.Module, BaseTunerLayer):
    adapter_layer_names = ("lota_A", "lota_B")
    other_param_names = ("r", "omega", "offset")

    def __init__(self, base_layer: nn.Module, quant: QuantWeights, adapter_name: str, *, r: int, omega: int,
                 offset: str, init_seed: Optional[int] = None, current_key: str = "", **kwargs) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.quant = quant  # how this layer's codes are read and written (formats/)
        self.lota_A = nn.ParameterDict({})
        self.lota_B = nn.ParameterDict({})
        self.r: dict[str, int] = {}
        self.omega: dict[str, int] = {}
        self.offset: dict[str, str] = {}
        self._disable_adapters = False
        self.merged_adapters: list[str] = []
        self._unmerged_snapshot: Optional[dict[str, torch.Tensor]] = None  # raw buffers before the first merge
        self.merge_reports: dict[str, dict] = {}
        self.in_features = base_layer.in_features
        self.out_features = base_layer.out_features
        self._current_key = current_key
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, r=r, omega=omega, offset=offset, init_seed=init_seed)

    # ---- adapters ----------------------------------------------------------------------------
    def update_layer(self, adapter_name: str, *, r: int, omega: int, offset: str, init_seed=None, **kwargs) -> None:
        generator = None
        if init_seed is not None:  # one reproducible stream per layer, independent of creation order
            generator = torch.Generator().manual_seed(init_seed + zlib.crc32(f"{self._current_key}/{adapter_name}".encode()))
        device = self.quant.device
        self.lota_A[adapter_name] = nn.Parameter(init_ternary_A(self.in_features, r, generator).to(device))
        self.lota_B[adapter_name] = nn.Parameter(torch.zeros(r, self.out_features, device=device))
        self.r[adapter_name], self.omega[adapter_name], self.offset[adapter_name] = r, omega, offset
        self.set_adapter(self.active_adapters)

    def product(self, adapter_name: str) -> torch.Tensor:
        """P = A @ B in float32, outside autocast: entries are exact integers in [-r, r]."""
        A, B = self.lota_A[adapter_name], self.lota_B[adapter_name]
        with torch.autocast(device_type=A.device.type, enabled=False):
            return A.float() @ B.float()

    def _unmerged_active(self) -> list[str]:
        return [a for a in self.active_adapters if a in self.lota_A and a not in self.merged_adapters]

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        active = self._unmerged_active()
        if not active:
            return self.base_layer(x, *args, **kwargs)
        state = self.quant.read()
        factors = [(self.lota_A[a], self.lota_B[a]) for a in active]
        # Same shapes and op order as gptqmodel's TorchLinear (2-D matmul, then bias), so a fresh
        # adapter, or the merged model, gives bit-identical outputs to the stock kernel.
        out = lota_linear(x.reshape(-1, x.shape[-1]), state, factors,
                          [self.omega[a] for a in active], [self.offset[a] for a in active])
        return out.reshape(*x.shape[:-1], self.out_features)

    # ---- deltas ------------------------------------------------------------------------------
    def _base_state(self) -> QuantState:
        """The layer's codes without any merged adapter."""
        if self._unmerged_snapshot is None:
            return self.quant.read()
        current = self.quant.snapshot()
        self.quant.restore(self._unmerged_snapshot)
        try:
            return self.quant.read()
        finally:
            self.quant.restore(current)

    @torch.no_grad()
    def get_delta_codes(self, adapter_name: str) -> torch.Tensor:
        """The integer code change D in {-1, 0, 1} (int8) this adapter applies to the unmerged codes, [out, in]."""
        state = self._base_state()
        _, _, _, (D,) = apply_adapters(state, [self.product(adapter_name)], [self.omega[adapter_name]],
                                       [self.offset[adapter_name]])
        return D.t().contiguous()

    @torch.no_grad()
    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """The float weight change of this adapter, [out, in]: scale * (D + offset), in float32.

        The offset is mu for offset="float" and the integer zero-point shift for offset="integer".
        """
        state = self._base_state()
        _, zeros, mu, (D,) = apply_adapters(state, [self.product(adapter_name)], [self.omega[adapter_name]],
                                            [self.offset[adapter_name]])
        steps = D.float()
        if mu is not None:
            steps = steps + mu[state.g_idx]
        elif self.offset[adapter_name] == "integer":
            steps = steps + (state.zeros.float() - zeros.float())[state.g_idx]
        return (state.scales[state.g_idx].float() * steps).t().contiguous()

    # ---- merge -------------------------------------------------------------------------------
    @torch.no_grad()
    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None,
              round_float_offset: bool = False) -> None:
        adapter_names = check_adapters_to_merge(self, adapter_names)
        if not adapter_names:
            return
        for name in adapter_names:
            if self.offset[name] == "float" and not round_float_offset:
                raise FloatOffsetMergeError(float_offset_merge_message(name))

        state = step = self.quant.read()
        for name in adapter_names:
            # A float offset merges like an integer one: mu rounded into the zero points.
            mode = "integer" if self.offset[name] == "float" else self.offset[name]
            factors = [(self.lota_A[name], self.lota_B[name])]
            codes, zeros, _ = adapt_codes(step, factors, [self.omega[name]], [mode])
            if self.offset[name] == "float":
                self.merge_reports[name] = self._rounding_report(step, name, codes, zeros)
            step = state.replace(codes=codes, zeros=zeros)

        buffers = self.quant.encode(step.codes, step.zeros)
        if safe_merge:
            self._check_merge(buffers, step.codes, step.zeros)
        if self._unmerged_snapshot is None:
            self._unmerged_snapshot = self.quant.snapshot()  # aliases: the merge swaps new buffers in
        self.quant.restore(buffers)
        self.merged_adapters.extend(adapter_names)

    def _rounding_report(self, step: QuantState, name: str, new_codes, new_zeros) -> dict:
        exact = effective_weight(step, *apply_adapters(step, [self.product(name)], [self.omega[name]], ["float"])[:3])
        rounded = dequantize(new_codes, new_zeros, step.scales, step.g_idx)
        change = (exact.float() - rounded.float()).abs()
        report = {"max_abs_weight_change": float(change.max()), "mean_abs_weight_change": float(change.mean())}
        logger.warning("LoTA adapter %r: float offset rounded into the zero points of %s; largest weight change %.3g.",
                       name, self._current_key or "a layer", report["max_abs_weight_change"])
        return report

    def _check_merge(self, buffers, codes, zeros) -> None:
        """safe_merge: decode the exact bytes about to be written and compare, before writing anything."""
        current = self.quant.snapshot()
        self.quant.restore(buffers)
        try:
            written = self.quant.read()
        finally:
            self.quant.restore(current)
        if not (torch.equal(written.codes, codes) and torch.equal(written.zeros.to(torch.int32), zeros.to(torch.int32))):
            raise ValueError(f"safe_merge: the packed merge of {self._current_key or 'a layer'} does not decode to "
                             "the adapted codes; nothing was written.")

    def unmerge(self) -> None:
        if not self.merged:
            logger.warning("Already unmerged. Nothing to do.")
            return
        self.quant.restore(self._unmerged_snapshot)
        self._unmerged_snapshot = None
        self.merged_adapters = []
        self.merge_reports = {}

    def __repr__(self) -> str:
        return "lota." + super().__repr__()
