"""The L4Q tuner layer: a LoRA inside a learnable quantizer, on a quantized layer or on a full-precision nn.Linear.

On a quantized layer (any format), W0 is recomputed from the layer's codes (formats/ reads them) and the grid (zero
points, base scales, g_idx) is the checkpoint's; a merge writes the new codes and scales back into the layer's
buffers. On an nn.Linear, W0 is its weight and the grid comes from L4Q's initialisation (quantizer.init_grid); a
merge asks the target format (GPTQ by default) to build the quantized layer that replaces it on unload.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, replace
from typing import Optional

import torch
from torch import nn
from peft.tuners.tuners_utils import check_adapters_to_merge

from .. import formats
from ..formats.base import Format, QuantWeights
from ..formats.packing import word_rows
from ..numerics import scale_multiplier
from ..guards import NonFiniteError, refuse_non_finite, refuse_non_finite_adapters
from ..tuner_layer import QuantLayer, RoundToStoredSTE
from .quantizer import Grid, default_g_idx, init_grid, l4q_linear, quantized_codes

logger = logging.getLogger(__name__)
_FIXED_SCALES_SAID: set = set()  # formats whose fixed scales were said once


@dataclass(frozen=True)
class L4QSettings:
    """One adapter's settings in a layer (from its L4QConfig)."""

    r: int
    scaling: float
    learn_scales: bool = True
    scale_gradient: str = "lsq"
    anchor_codes: bool = False
    scale_rate: float = 1.0  # L4QConfig.scale_rate: the scales' multiplier is 1 + scale_rate * u


class L4QLayer(QuantLayer):
    adapter_layer_names = ("l4q_A", "l4q_B", "l4q_scales")
    other_param_names = ("settings",)
    method_title = "L4Q"
    config_name = "L4QConfig"

    def __init__(self, base_layer: nn.Module, quant: Optional[QuantWeights], adapter_name: str,
                 settings: L4QSettings, *, quantizer: Optional[tuple[int, int, bool]] = None,
                 target_format: Optional[Format] = None, init_seed: Optional[int] = None, current_key: str = "",
                 **kwargs) -> None:
        """quant: how to read the codes of a quantized base layer; None for an nn.Linear, which then needs
        quantizer = (bits, group_size, sym) to initialise its grid, and the format a merge builds (formats.default_build_format() if None)."""
        super().__init__(base_layer, quant, adapter_name, current_key)
        self.l4q_A = nn.ParameterDict({})
        self.l4q_B = nn.ParameterDict({})
        self.l4q_scales = nn.ParameterDict({})  # u of the learned scales s0 * (1 + scale_rate * u)
        self.settings: dict[str, L4QSettings] = {}
        self.target_format_name: Optional[str] = None  # nn.Linear base: the format a merge builds (a name: picklable)
        if quant is None:
            self._init_dense_grid(*quantizer, target_format or formats.default_build_format())
        self.update_layer(adapter_name, settings, init_seed=init_seed)

    # ---- the grid ----------------------------------------------------------------------------
    def _init_dense_grid(self, bits: int, group_size: int, sym: bool, target_format: Format) -> None:
        K = self.in_features
        problem = target_format.grid_problem(K, self.out_features, bits, group_size, sym)
        if problem:
            raise ValueError(
                f"L4Q cannot quantize {self._current_key or 'a layer'} (in_features={K}, out_features="
                f"{self.out_features}) into a {bits}-bit {target_format.title} layer: {problem} Choose other bits or "
                "group_size, another format, or exclude the layer.")
        self.target_format_name = target_format.name
        # A tiny layer of that format (32 x 32 codes fill whole words at every width; no bias): how its kernel treats
        # activations and bias, which the adapted forward follows so that it computes what the merged layer will.
        n = 32
        centred = torch.full((1, n), 1 << (bits - 1), dtype=torch.int32)  # storable in every format
        proto = target_format.build_layer(torch.zeros(n, n, dtype=torch.uint8), centred,
                                          torch.ones(1, n, dtype=torch.float16), torch.zeros(n, dtype=torch.int32),
                                          None, bits, -1, sym)
        self._kernel = target_format.dispatch(proto, "")
        weight = self.base_layer.weight.detach()
        with torch.no_grad():
            scales, zeros = init_grid(weight.t(), bits, group_size, sym)
        # Not persistent: the grid is a function of the frozen weight, recomputed identically when an adapter loads.
        self.register_buffer("l4q_grid_scales", scales, persistent=False)
        self.register_buffer("l4q_grid_zeros", zeros, persistent=False)
        self.register_buffer("l4q_grid_g_idx", default_g_idx(K, group_size, weight.device), persistent=False)
        self.quantizer = (bits, group_size, sym)

    def grid(self) -> Grid:
        """W0 and its grid as they are now (a quantized base's codes are read anew: cheap, metadata is cached)."""
        if self.quant is not None:
            return Grid.from_quantized(self.quant.read())
        base = self.base_layer
        bits = self.quantizer[0]
        # The bias as the checkpoint will store it (the grid's dtype, fp16), so that the merge changes nothing.
        bias = None if base.bias is None else base.bias.detach().to(self.l4q_grid_scales.dtype)
        return Grid.from_dense(base.weight.detach(), bias,
                               self.l4q_grid_scales, self.l4q_grid_zeros, self.l4q_grid_g_idx, (1 << bits) - 1,
                               word_rows(bits))

    @property
    def target_format(self) -> Optional[Format]:
        return None if self.target_format_name is None else formats.by_name(self.target_format_name)

    @property
    def bits(self) -> int:
        return self.quant.bits if self.quant is not None else self.quantizer[0]

    # ---- adapters ----------------------------------------------------------------------------
    def update_layer(self, adapter_name: str, settings: L4QSettings, init_seed=None, **kwargs) -> None:
        generator = self._new_adapter(adapter_name, settings.r, init_seed)
        device = self._device()
        A = torch.empty(settings.r, self.in_features)
        bound = 1 / math.sqrt(self.in_features)  # nn.init.kaiming_uniform_(a=sqrt(5)), as PEFT's LoRA
        A.uniform_(-bound, bound, generator=generator)
        self.l4q_A[adapter_name] = nn.Parameter(A.to(device))
        self.l4q_B[adapter_name] = nn.Parameter(torch.zeros(self.out_features, settings.r, device=device))
        if settings.learn_scales and self.quant is not None and not self.quant.trains_scales:
            settings = replace(settings, learn_scales=False)
            if self.quant.format_name not in _FIXED_SCALES_SAID:  # once per format and process: said, not repeated
                _FIXED_SCALES_SAID.add(self.quant.format_name)
                logger.warning("L4Q: %s (and every such %s layer) keeps its scales: its grid stores no free scale per "
                               "group (GGUF's K-quants); its codes are re-rounded.", self._current_key or "a layer",
                               self.quant.format_name)
        if settings.learn_scales:
            groups = self.grid().state.scales.shape[0]
            self.l4q_scales[adapter_name] = nn.Parameter(torch.zeros(groups, self.out_features, device=device))
        self.settings[adapter_name] = settings
        self.set_adapter(self.active_adapters)

    def _device(self) -> torch.device:
        return self.quant.device if self.quant is not None else self.base_layer.weight.device

    def scales(self, adapter_name: str, grid: Grid) -> Optional[torch.Tensor]:
        """The trained scales (float32, rounded to the stored dtype), or None if this adapter does not learn them."""
        if adapter_name not in self.l4q_scales:
            return None
        s0 = grid.state.scales  # rounded to what the checkpoint stores (GGUF: fp16 d, its products in float32)
        return RoundToStoredSTE.apply(s0.float() * scale_multiplier(self.l4q_scales[adapter_name],
                                                                      self.settings[adapter_name].scale_rate),
                                      grid.state.scale_dtype)

    def adapted_forward(self, x: torch.Tensor, active: list[str]) -> torch.Tensor:
        if len(active) > 1:
            raise ValueError(f"L4Q quantizes the base weight plus one adapter's LoRA; {self._current_key} has "
                             f"{len(active)} active adapters ({', '.join(active)}). Activate one (set_adapter).")
        name = active[0]
        # The dtypes and bias of the format's kernel: the base's, or (nn.Linear base) the one a merge builds.
        kernel = self.quant if self.quant is not None else self._kernel
        x2 = kernel.kernel_input(x.reshape(-1, x.shape[-1]))  # (it may convert its scales, as the kernel does)
        if self.quant is None:  # ... and then the merged layer would hold them so: the grid's scales follow
            dtype = kernel.read().scales.dtype
            if self.l4q_grid_scales.dtype != dtype:
                self.l4q_grid_scales = self.l4q_grid_scales.to(dtype)
        grid = self.grid()
        settings = self.settings[name]
        bias = grid.state.bias
        if kernel.fuses_bias:  # the bias inside the kernel's matmul
            bias = None
        else:
            grid.state = grid.state.replace(bias=None)
        out = l4q_linear(x2, grid, self.l4q_A[name], self.l4q_B[name], settings.scaling,
                         self.scales(name, grid), settings.scale_gradient, settings.anchor_codes)
        out = kernel.kernel_output(out, bias, x.dtype)
        return out.reshape(*x.shape[:-1], self.out_features)

    # ---- merge -------------------------------------------------------------------------------
    @torch.no_grad()
    def quantized(self, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, Grid]:
        """(codes uint8 [K, N], zeros, scales in the stored dtype, grid) of W_q for this adapter."""
        grid = self.grid()
        scales = self.scales(adapter_name, grid)
        s32 = grid.state.scales.float() if scales is None else scales
        settings = self.settings[adapter_name]
        codes = quantized_codes(grid, self.l4q_A[adapter_name], self.l4q_B[adapter_name], settings.scaling,
                                grid.state.scales.float() if settings.anchor_codes else s32)
        return codes, grid.state.zeros, s32.to(grid.state.scales.dtype), grid

    @torch.no_grad()
    def get_delta_codes(self, adapter_name: str) -> Optional[torch.Tensor]:
        """The integer code change (int16, [out, in]) this adapter makes to a quantized base; None on an nn.Linear."""
        if self.quant is None:
            return None
        codes, _, _, grid = self.quantized(adapter_name)
        before = grid.state.codes.to(torch.int16)
        return (codes.to(torch.int16) - before).t().contiguous()

    @torch.no_grad()
    def check_finite(self, adapter_names, refused: str) -> None:
        """Refuse NaN/inf in these adapters' tensors, in the scales a merge would write, and codes that would be NaN.

        A NaN code would be cast to some integer (0 on x86) and merged as if nothing were wrong. The codes are
        clamp(round(W_comb / s) + z): with finite tensors, NaN only where W_comb = W0 + scaling B A overflows
        float32 (inf - inf), ruled out cheaply with |W0| <= max|s0| * (maxq + 1) and |B A| <= r max|A| max|B|.
        (Where s = 0 the code is 0 / 0 too, but the weight s * (Q - z) is 0 whatever it is: not refused.)
        """
        names = [a for a in adapter_names if a in self.l4q_A]
        refuse_non_finite_adapters(self, names, refused)
        grid = self.grid()
        for name in names:
            s = self.scales(name, grid)
            s = (grid.state.scales if s is None else s).to(grid.state.scales.dtype)
            refuse_non_finite(s, f"{self._current_key}: the scales a merge would write", refused)
            A, B = self.l4q_A[name].double(), self.l4q_B[name].double()
            bound = (grid.state.scales.double().abs().amax() * (grid.state.maxq + 1)
                     + self.settings[name].scaling * A.shape[0] * A.abs().amax() * B.abs().amax())
            if not bound < torch.finfo(torch.float32).max:
                raise NonFiniteError(f"{self._current_key}: the codes a merge of adapter {name!r} would write are "
                                     "undefined (l4q_A and l4q_B are so large that W0 + B A overflows float32): "
                                     f"{refused} refused. The training diverged: go back to a checkpoint saved "
                                     "before that and train on with a lower learning rate.")

    @torch.no_grad()
    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        adapter_names = check_adapters_to_merge(self, adapter_names)
        if not adapter_names:
            return
        if len(adapter_names) > 1 or self.merged_adapters:
            raise ValueError("L4Q merges one adapter into a layer (the quantized result of W0 plus its LoRA); "
                             f"asked for {adapter_names} with {self.merged_adapters or 'none'} merged already.")
        name = adapter_names[0]
        codes, zeros, scales, grid = self.quantized(name)
        if self.quant is not None:
            # scales only where they were learned (a grid with fixed scales, GGUF's K-quants, takes codes alone)
            buffers = self.quant.encode(codes, zeros, scales if name in self.l4q_scales else None)
            if safe_merge:
                self.check_encoded(buffers, codes, zeros, scales)
            self.write_merged(buffers)
        else:
            bits, group_size, sym = self.quantizer
            layer = self.target_format.build_layer(codes, zeros, scales, grid.state.g_idx, grid.state.bias, bits,
                                                   group_size, sym)
            if safe_merge:
                written = self.target_format.dispatch(layer, self._current_key).read()
                if not (torch.equal(written.codes, codes) and torch.equal(written.scales, scales)):
                    raise ValueError(f"safe_merge: the {self.target_format.title} layer built for "
                                     f"{self._current_key} does not decode to the codes and scales.")
            self.merged_layer = layer.to(self.base_layer.weight.device)
        self.merged_adapters.append(name)
