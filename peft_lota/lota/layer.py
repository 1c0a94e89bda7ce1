"""The LoTA tuner layer: ternary A, B (and optionally trained scales) on top of an integer-coded base layer.

Format-agnostic: the layer reads and writes its base layer's codes only through a `QuantWeights`
(formats/), which knows how they are stored. Forward, merge, unmerge and deltas are written once
here, on top of the pure functions of ternary.py.

Two ways to hold A and B (`LotaConfig.train_mode`):
- "latent": real-valued A, B that any optimizer trains; the forward uses their ternary values
  (straight-through gradient), so what is merged is exactly what the forward computed;
- "ternary": A, B hold {-1, 0, 1} themselves and only the paper's t-SignSGD (optim.py) may update
  them; values outside {-1, 0, 1} are refused at every forward, save and merge.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn
from peft.tuners.tuners_utils import check_adapters_to_merge

from ..formats.base import QuantState, QuantWeights, dequantize
from ..numerics import LOTA_SCALE_UNIT, scale_multiplier
from ..guards import refuse_non_finite, refuse_non_finite_adapters
from ..tuner_layer import QuantLayer, RoundToStoredSTE
from .ternary import adapt_codes, apply_adapters, effective_weight, init_ternary_A, is_ternary, lota_linear

logger = logging.getLogger(__name__)
_FIXED_SCALES_SAID: set = set()


class FloatOffsetMergeError(ValueError):
    """Raised when asked to merge an offset="float" adapter without opting in to rounding."""


class NotTernaryError(ValueError):
    """A ternary-mode adapter holds values outside {-1, 0, 1}: something other than t-SignSGD trained it."""


def float_offset_merge_message(adapter_name: str) -> str:
    return (
        f"LoTA adapter {adapter_name!r} was trained with offset='float'. Its offset mu is a fraction of a "
        "quantization step per group and output column, while a quantized checkpoint stores integer zero points, so "
        "it cannot be merged without changing the model. Alternatives: (1) keep it unmerged and run the "
        "PeftModel; (2) train with LotaConfig(offset='integer') (exactly mergeable) or offset='none'; "
        "(3) pass round_float_offset=True to merge mu rounded to the nearest integer zero-point shift "
        "(the largest weight change is reported)."
    )


def not_ternary_message(adapter_name: str, where: str) -> str:
    return (
        f"LoTA adapter {adapter_name!r} has train_mode='ternary' (the paper's t-SignSGD), but its lota_A/lota_B hold "
        f"values outside {{-1, 0, 1}} at {where}: an optimizer other than t-SignSGD updated them (e.g. the AdamW a "
        "Trainer builds by default). Either train it with optimizers=(peft_lota.create_lota_optimizer(model), None) "
        "and callbacks=[peft_lota.LotaCallback()], or create it with LotaConfig(train_mode='latent') (the default), "
        "which trains under any optimizer."
    )


@dataclass(frozen=True)
class AdapterSettings:
    """One adapter's settings in a layer (from its LotaConfig)."""

    r: int
    omega: int
    offset: str = "none"
    max_step: int = 1
    train_mode: str = "latent"
    latent_threshold: float = 1e-3  # LotaConfig's default
    train_scales: bool = False

    @property
    def step(self) -> tuple[int, str, int]:
        return self.omega, self.offset, self.max_step


class TernarizeSTE(torch.autograd.Function):
    """sign(v) where |v| > threshold, else 0; the gradient passes straight through."""

    @staticmethod
    def forward(ctx, latent: torch.Tensor, threshold: float) -> torch.Tensor:
        return ternarize(latent, threshold)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def ternarize(latent: torch.Tensor, threshold: float) -> torch.Tensor:
    return (latent > threshold).to(latent.dtype) - (latent < -threshold).to(latent.dtype)


class LotaLayer(QuantLayer):
    adapter_layer_names = ("lota_A", "lota_B", "lota_scales", "lota_offsets")
    other_param_names = ("settings",)
    method_title = "LoTA"
    config_name = "LotaConfig"

    def __init__(self, base_layer: nn.Module, quant: QuantWeights, adapter_name: str, settings: AdapterSettings, *,
                 init_seed: Optional[int] = None, current_key: str = "", **kwargs) -> None:
        super().__init__(base_layer, quant, adapter_name, current_key)
        self.lota_A = nn.ParameterDict({})
        self.lota_B = nn.ParameterDict({})
        self.lota_scales = nn.ParameterDict({})  # u of the trained scales s0 * (1 + LOTA_SCALE_UNIT * u)
        self.lota_offsets = nn.ParameterDict({})  # u of the trained float offsets m0 + LOTA_SCALE_UNIT * s0 * u
        self.settings: dict[str, AdapterSettings] = {}
        self.merge_reports: dict[str, dict] = {}
        self.update_layer(adapter_name, settings, init_seed=init_seed)

    # ---- adapters ----------------------------------------------------------------------------
    def update_layer(self, adapter_name: str, settings: AdapterSettings, init_seed=None, **kwargs) -> None:
        if settings.offset != "none" and self.quant.fixed_zero_points:
            raise ValueError(f"LotaConfig(offset={settings.offset!r}) moves zero points, and {self._current_key} is a "
                             f"{self.quant.format_name} layer, which is symmetric with no zero points to move: use "
                             "offset='none' (the default).")
        generator = self._new_adapter(adapter_name, settings.r, init_seed)
        device = self.quant.device
        A = init_ternary_A(self.in_features, settings.r, generator)
        if settings.train_mode == "latent":  # each entry in the middle of its ternary level
            A = A * (2 * settings.latent_threshold)
        self.lota_A[adapter_name] = nn.Parameter(A.to(device))
        self.lota_B[adapter_name] = nn.Parameter(torch.zeros(settings.r, self.out_features, device=device))
        if settings.train_scales and not self.quant.trains_scales:
            if self.quant.format_name not in _FIXED_SCALES_SAID:  # once per format and process: said, not repeated
                _FIXED_SCALES_SAID.add(self.quant.format_name)
                logger.warning("LoTA: %s (and every such %s layer) keeps its scales: its grid stores no free scale per "
                               "group (GGUF's K-quants); its codes train.", self._current_key or "a layer",
                               self.quant.format_name)
        elif settings.train_scales:
            state = self.quant.read()
            groups = state.scales.shape[0]
            self.lota_scales[adapter_name] = nn.Parameter(torch.zeros(groups, self.out_features, device=device))
            if state.offsets is not None:  # a grid storing a float offset per group (GGUF's Q4_1 / Q5_1 m) trains it too
                self.lota_offsets[adapter_name] = nn.Parameter(torch.zeros(groups, self.out_features, device=device))
        self.settings[adapter_name] = settings
        self.set_adapter(self.active_adapters)

    # PEFT's own accessors of the settings, for code that reads them per adapter
    @property
    def r(self) -> dict[str, int]:
        return {a: s.r for a, s in self.settings.items()}

    @property
    def omega(self) -> dict[str, int]:
        return {a: s.omega for a, s in self.settings.items()}

    @property
    def offset(self) -> dict[str, str]:
        return {a: s.offset for a, s in self.settings.items()}

    def factors(self, adapter_name: str, where: str = "forward") -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B) as the forward uses them: ternary values, with gradients to the latent values if any."""
        A, B = self.lota_A[adapter_name], self.lota_B[adapter_name]
        settings = self.settings[adapter_name]
        if settings.train_mode == "latent":
            return TernarizeSTE.apply(A, settings.latent_threshold), TernarizeSTE.apply(B, settings.latent_threshold)
        if not (is_ternary(A) and is_ternary(B)):
            raise NotTernaryError(not_ternary_message(adapter_name, where))
        return A, B

    def product(self, adapter_name: str, where: str = "a delta") -> torch.Tensor:
        """P = A @ B in float32, outside autocast: entries are exact integers in [-r, r]."""
        A, B = (t.detach() for t in self.factors(adapter_name, where))
        with torch.autocast(device_type=A.device.type, enabled=False):
            return A.float() @ B.float()

    def scales_after(self, state: QuantState, adapter_names) -> Optional[torch.Tensor]:
        """The scales (float32, each rounded to the stored dtype) after these adapters' trained multipliers, or
        None if none of them trains scales. Adapters apply in turn, each result rounded, as merges do."""
        trained = [a for a in adapter_names if a in self.lota_scales]
        if not trained:
            return None
        s = state.scales.float()
        for a in trained:
            s = RoundToStoredSTE.apply(s * scale_multiplier(self.lota_scales[a], LOTA_SCALE_UNIT), state.scale_dtype)
        return s

    def offsets_after(self, state: QuantState, adapter_names) -> Optional[torch.Tensor]:
        """The float offsets (float32, each rounded to the stored dtype) after these adapters' trained changes, or
        None if none of them trains offsets. The scale multiplier applies to the offset too, so that it scales the
        group's weights w = s * q + m about zero, as it does on a grid with zero points (w = s * (q - z)); the
        offset's own change is in units of the group's scale before that adapter (one optimizer step moves it by
        about as large a fraction of a quantization step as it moves the scale). Adapters apply in turn, as merges
        do: merging them together or one by one writes the same offsets. A group whose scale is 0 keeps its offset."""
        trained = [a for a in adapter_names if a in self.lota_offsets]
        if not trained:
            return None
        m, s = state.offsets.float(), state.scales.float()
        for a in adapter_names:
            multiplier = scale_multiplier(self.lota_scales[a], LOTA_SCALE_UNIT) if a in self.lota_scales else None
            if a in self.lota_offsets:
                if multiplier is not None:
                    m = torch.where(s != 0, m * multiplier, m)
                m = RoundToStoredSTE.apply(m + LOTA_SCALE_UNIT * s.detach() * self.lota_offsets[a], state.scale_dtype)
            if multiplier is not None:  # the next adapter's unit: the scales this one leaves
                s = (s.detach() * multiplier.detach()).to(state.scale_dtype).float()
        return m

    def adapted_forward(self, x: torch.Tensor, active: list[str]) -> torch.Tensor:
        # Same shapes, dtypes and op order as the format's stock kernel (2-D matmul, then bias), so a fresh
        # adapter, or the merged model, gives bit-identical outputs to it.
        x2 = self.quant.kernel_input(x.reshape(-1, x.shape[-1]))
        state = self.quant.read()  # after kernel_input, which may convert the scales as the kernel does
        factors = [self.factors(a) for a in active]
        scales = self.scales_after(state, active)
        offsets = self.offsets_after(state, active)  # (on the base scales: the unit of an offset's change)
        fused = self.quant.fuses_bias  # the bias inside the kernel's matmul, or added after it
        out = lota_linear(x2, state if fused else state.replace(bias=None), factors,
                          [self.settings[a].step for a in active], scales, offsets)
        out = self.quant.kernel_output(out, None if fused else state.bias, x.dtype)
        return out.reshape(*x.shape[:-1], self.out_features)

    # ---- deltas ------------------------------------------------------------------------------
    def _adapted(self, adapter_name: str):
        """(state before, codes', zeros', mu, D) of this adapter alone on the unmerged codes (reference maths)."""
        state = self.base_state()
        s = self.settings[adapter_name]
        codes, zeros, mu, (D,) = apply_adapters(state, [self.product(adapter_name)], [s.omega], [s.offset],
                                                [s.max_step])
        return state, codes, zeros, mu, D

    @torch.no_grad()
    def get_delta_codes(self, adapter_name: str) -> torch.Tensor:
        """The integer code change D (int8) this adapter applies to the unmerged codes, [out, in].

        D is in {-1, 0, 1}, or in {-max_step..max_step} with wider steps.
        """
        return self._adapted(adapter_name)[4].t().contiguous()

    @torch.no_grad()
    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """The float weight change of this adapter, [out, in], in float32: W' - W.

        W' = s' * (Q + D - z' + mu): s' the trained scales (if any), z' the zero points after an integer
        offset, mu the float offset.
        """
        state, codes, zeros, mu, _ = self._adapted(adapter_name)
        scales = self.scales_after(state, [adapter_name])
        # In float32 every product s * (Q - z) is exact (11 x 9 significant bits): so is s * D without trained scales.
        before = dequantize(state.codes, state.zeros, state.scales.float(), state.g_idx)
        after = dequantize(codes, zeros, (state.scales if scales is None else scales).float(), state.g_idx)
        if mu is not None:
            after = after + (state.scales if scales is None else scales).float()[state.g_idx] * mu[state.g_idx]
        offsets = self.offsets_after(state, [adapter_name])
        if offsets is not None:  # (the base's offsets are in both weights: only their change)
            after = after + (offsets - state.offsets.float())[state.g_idx]
        return (after - before).t().contiguous()

    # ---- merge -------------------------------------------------------------------------------
    @torch.no_grad()
    def check_finite(self, adapter_names, refused: str) -> None:
        """Refuse NaN/inf in these adapters' tensors and in the scales a merge of them would write.

        (A NaN latent would ternarize to 0 and merge as if nothing were wrong; the codes themselves are integer
        steps of finite ternary values.)
        """
        names = [a for a in adapter_names if a in self.lota_A]
        refuse_non_finite_adapters(self, names, refused)
        if not any(a in self.lota_scales or a in self.lota_offsets for a in names):
            return
        state = self.quant.read()  # finite multipliers may still overflow the stored dtype
        for what, after in (("scales", self.scales_after), ("offsets", self.offsets_after)):
            values = after(state, names)
            if values is not None:
                refuse_non_finite(values.to(state.scale_dtype), f"{self._current_key}: the {what} a merge would write",
                                  refused)

    @torch.no_grad()
    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None,
              round_float_offset: bool = False) -> None:
        adapter_names = check_adapters_to_merge(self, adapter_names)
        if not adapter_names:
            return
        for name in adapter_names:
            if self.settings[name].offset == "float" and not round_float_offset:
                raise FloatOffsetMergeError(float_offset_merge_message(name))

        state = step = self.quant.read()
        for name in adapter_names:
            s = self.settings[name]
            # A float offset merges like an integer one: mu rounded into the zero points.
            mode = "integer" if s.offset == "float" else s.offset
            codes, zeros, _ = adapt_codes(step, [self.factors(name, "merge")], [s.omega], [mode], [s.max_step])
            if s.offset == "float":
                self.merge_reports[name] = self._rounding_report(step, name, codes, zeros)
            scales = self.scales_after(step, [name])
            offsets = self.offsets_after(step, [name])  # (on the scales before this adapter, as the forward)
            step = state.replace(codes=codes, zeros=zeros,
                                 scales=step.scales if scales is None else scales.to(step.scales.dtype),
                                 offsets=step.offsets if offsets is None else offsets)

        trained_scales = any(n in self.lota_scales for n in adapter_names)
        trained_offsets = {"offsets": step.offsets} if any(n in self.lota_offsets for n in adapter_names) else {}
        buffers = self.quant.encode(step.codes, step.zeros, step.scales if trained_scales else None, **trained_offsets)
        if safe_merge:
            self.check_encoded(buffers, step.codes, step.zeros, step.scales, step.offsets)
        self.write_merged(buffers)
        self.merged_adapters.extend(adapter_names)

    def _rounding_report(self, step: QuantState, name: str, new_codes, new_zeros) -> dict:
        s = self.settings[name]
        exact = effective_weight(step, *apply_adapters(step, [self.product(name, "merge")], [s.omega], ["float"],
                                                       [s.max_step])[:3])
        rounded = dequantize(new_codes, new_zeros, step.scales, step.g_idx)
        change = (exact.float() - rounded.float()).abs()
        report = {"max_abs_weight_change": float(change.max()), "mean_abs_weight_change": float(change.mean())}
        logger.warning("LoTA adapter %r: float offset rounded into the zero points of %s; largest weight change %.3g.",
                       name, self._current_key or "a layer", report["max_abs_weight_change"])
        return report

    def unmerge(self) -> None:
        super().unmerge()
        self.merge_reports = {}
