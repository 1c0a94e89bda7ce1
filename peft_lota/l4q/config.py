"""L4QConfig: the PEFT configuration of an L4Q adapter (LoRA trained through a learnable quantizer)."""

from __future__ import annotations

import math

from dataclasses import dataclass, field
from typing import Optional, Union

from peft.config import PeftConfig

from ..formats.packing import SUPPORTED_BITS
from ..peft_types import L4Q_PEFT_TYPE
from ..tuner import BASE_LAYERS_HELP, check_common_config


@dataclass
class L4QConfig(PeftConfig):
    """Configuration of an L4Q adapter (arXiv 2402.04902): a LoRA inside the quantizer, trained quantization-aware.

    Each targeted layer computes `W_q = s * (clamp(round((W0 + (lora_alpha / r) B A) / s) + z, 0, maxq) - z)`:
    the model that trains is already the quantized model, so `merge_and_unload()` writes exactly it as a
    standard quantized checkpoint (codes, the trained scales, the zero points): the base's format, or from full
    precision the one `format` names (GPTQ by default). W0 is the frozen weight of a full-precision model, or the
    dequantized weight of a quantized model (recomputed from its codes).
    """

    r: int = field(default=16, metadata={"help": "LoRA rank of A [r, in] and B [out, r]."})
    lora_alpha: float = field(default=16, metadata={"help": "LoRA scaling numerator: the update is (lora_alpha / r) B A."})
    lora_dropout: float = field(
        default=0.0,
        metadata={"help": "Must be 0: L4Q's LoRA update is quantized together with the base weight, so there is no "
                          "separate LoRA branch for dropout to act on (accepted for LoraConfig compatibility)."},
    )
    target_modules: Optional[Union[list[str], str]] = field(
        default=None,
        metadata={"help": "Layers to adapt: a list of name suffixes (e.g. ['q_proj', 'v_proj']), a regex matched "
                          "against the full module name, or 'all-linear' (the default): every quantized layer of a "
                          "quantized model, every nn.Linear but the output head of a full-precision model."},
    )
    exclude_modules: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "Names (list of suffixes) or a regex of modules to leave alone."})
    layers_to_transform: Optional[Union[list[int], int]] = field(
        default=None, metadata={"help": "Indices of the decoder layers to adapt; others are left alone."})
    layers_pattern: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "Name of the decoder-layer list (e.g. 'layers'), used with layers_to_transform."})
    modules_to_save: Optional[list[str]] = field(
        default=None,
        metadata={"help": "Modules other than L4Q layers to train in full precision and save with the adapter "
                          "(e.g. an unquantized classification head). They are not quantized by the merge."},
    )
    bits: Optional[int] = field(
        default=None,
        metadata={"help": "Code width, one of 2, 3, 4, 8. From a quantized model: the checkpoint's (None, or the same "
                          "value). From full precision: the width of the checkpoint the merge writes (default 4)."},
    )
    group_size: Optional[int] = field(
        default=None,
        metadata={"help": "Input rows per quantization group (-1: one group per output column). From a quantized model: "
                          "the checkpoint's. From full precision: default 128; it must divide every adapted layer's "
                          "in_features."},
    )
    sym: Optional[bool] = field(
        default=None,
        metadata={"help": "Symmetric grid (zero point 2^(bits-1), L4Q's initialisation: s = max(|min| / 2^(bits-1), "
                          "max / (2^(bits-1) - 1)) per group) or asymmetric (min-max). From a quantized model: the "
                          "checkpoint's. From full precision: default True."},
    )
    format: Optional[str] = field(
        default=None,
        metadata={"help": "From full precision: the format of the checkpoint the merge writes, 'gptq' (the default) "
                          "or 'awq' (the formats peft_lota builds layers of; the grid must fit it: AWQ needs "
                          "group_size to divide every in_features). From a quantized model: the checkpoint's own "
                          "(None, or the same name)."},
    )
    learn_scales: bool = field(
        default=True,
        metadata={"help": "Train the quantization scales (one multiplier per group and output column, LSQ-style "
                          "gradient). The forward uses them rounded to fp16, the dtype the checkpoint stores."},
    )
    scale_gradient: Optional[str] = field(
        default=None,
        metadata={"help": "How the scales' gradient treats the codes. 'lsq' (the paper, LSQ; the default): as moving "
                          "with the scale (round(w/s) - w/s inside the grid, the code where clipped). 'codes': as fixed "
                          "(Q - z), the weights' own derivative (the default, and the only choice, with anchor_codes)."},
    )
    anchor_codes: bool = field(
        default=False,
        metadata={"help": "Round onto the starting grid: codes = round((W0 + scaling B A) / s0) + z with the scales s0 "
                          "the adapter started from (the checkpoint's), while the trained scales stretch that grid "
                          "without re-rounding it, so a code moves only where the LoRA passes half a step of it. False "
                          "(the paper): the codes round against the trained scales, so a scale change can move codes."},
    )
    scale_rate: float = field(
        default=1.0,
        metadata={"help": "How fast the trained scales move against the LoRA: a scale is s0 * (1 + scale_rate * u), "
                          "so one optimizer step at rate lr changes it by up to about scale_rate * lr of itself. 1: a "
                          "step at L4Q's usual rate (1e-3) moves a scale by ~0.1%; LoTA's trained scales move ~1% a "
                          "step at its rate."},
    )
    base_layers: Optional[dict] = field(default=None, metadata={"help": BASE_LAYERS_HELP})
    init_seed: Optional[int] = field(
        default=None, metadata={"help": "Seed for the Kaiming-uniform initialisation of A (None: torch's global one)."})

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = L4Q_PEFT_TYPE
        check_common_config(self, "L4QConfig")
        if isinstance(self.lora_alpha, bool) or not isinstance(self.lora_alpha, (int, float)) or self.lora_alpha <= 0:
            raise ValueError(f"L4QConfig: lora_alpha must be a positive number, got {self.lora_alpha!r}.")
        if self.lora_dropout:
            raise ValueError(
                f"L4QConfig: lora_dropout={self.lora_dropout} is not supported: L4Q quantizes the LoRA update together "
                "with the base weight, so there is no separate LoRA branch to apply dropout to. Set lora_dropout=0.")
        if self.bits is not None and self.bits not in SUPPORTED_BITS:
            raise ValueError(f"L4QConfig: bits must be one of {SUPPORTED_BITS}, got {self.bits!r}.")
        if self.group_size is not None and (isinstance(self.group_size, bool) or not isinstance(self.group_size, int)
                                            or (self.group_size < 1 and self.group_size != -1)):
            raise ValueError(f"L4QConfig: group_size must be a positive integer or -1 (one group per column), "
                             f"got {self.group_size!r}.")
        if self.format is not None:
            from ..formats import FORMATS

            if self.format not in [f.name for f in FORMATS]:
                raise ValueError(f"L4QConfig: format must be one of {', '.join(repr(f.name) for f in FORMATS)} (or "
                                 f"None), got {self.format!r}.")
        if self.sym is not None and not isinstance(self.sym, bool):
            raise ValueError(f"L4QConfig: sym must be True, False or None, got {self.sym!r}.")
        if not isinstance(self.anchor_codes, bool):
            raise ValueError(f"L4QConfig: anchor_codes must be True or False, got {self.anchor_codes!r}.")
        if self.scale_gradient is None:
            self.scale_gradient = "codes" if self.anchor_codes else "lsq"
        if self.scale_gradient not in ("lsq", "codes"):
            raise ValueError(f"L4QConfig: scale_gradient must be 'lsq' or 'codes', got {self.scale_gradient!r}.")
        if self.anchor_codes and self.scale_gradient == "lsq":
            raise ValueError("L4QConfig: anchor_codes=True keeps the codes where the starting grid rounds them, so the "
                             "scales' gradient is their own (scale_gradient='codes', the default with it); LSQ's "
                             "gradient assumes codes that re-round as the scales move.")
        if isinstance(self.scale_rate, bool) or not isinstance(self.scale_rate, (int, float)) \
                or not (math.isfinite(self.scale_rate) and self.scale_rate > 0):
            raise ValueError(f"L4QConfig: scale_rate must be a positive number, got {self.scale_rate!r}.")
        if not isinstance(self.learn_scales, bool):
            raise ValueError(f"L4QConfig: learn_scales must be True or False, got {self.learn_scales!r}.")

    @property
    def scaling(self) -> float:
        return self.lora_alpha / self.r

    @staticmethod
    def describe_settings(config: dict) -> list[tuple[str, object]]:
        """(key, value) rows of a saved L4QConfig (adapter_config.json), for the command line's inspect."""
        return [("lora_alpha", config.get("lora_alpha")), ("learned scales", config.get("learn_scales")),
                ("scale rate", config.get("scale_rate", 1.0)), ("anchored codes", config.get("anchor_codes", False)),
                ("grid (bits, group, sym)", (config.get("bits"), config.get("group_size"), config.get("sym")))]

    def quantizer(self) -> tuple[int, int, bool]:
        """(bits, group_size, sym) for a full-precision start, with the defaults filled in."""
        return (4 if self.bits is None else self.bits, 128 if self.group_size is None else self.group_size,
                True if self.sym is None else self.sym)
