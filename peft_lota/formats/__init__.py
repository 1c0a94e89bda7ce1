"""Quantized-layer formats: read codes, zeros and scales, and write merged ones back.

Each format is one file with its `dispatch_<format>` and a `FORMAT` descriptor (base.Format); the
functions here ask every registered format in turn, so no caller chains if/else over formats.
"""

from __future__ import annotations

from typing import Optional

from torch import nn

from . import gptq
from .base import Format, QuantState, QuantWeights, dequantize, group_layout

FORMATS: tuple[Format, ...] = (gptq.FORMAT,)


def dispatch(module: nn.Module, name: str = "") -> Optional[QuantWeights]:
    """The QuantWeights of `module` in whichever format it is, or None if it is not a quantized layer."""
    for fmt in FORMATS:
        weights = fmt.dispatch(module, name)
        if weights is not None:
            return weights
    return None


def is_quantized_layer(module: nn.Module) -> bool:
    return any(fmt.is_layer(module) for fmt in FORMATS)


def prepare_model(model: nn.Module) -> int:
    """Make every quantized layer of `model` readable and trainable; returns how many layers changed."""
    return sum(fmt.prepare_model(model) for fmt in FORMATS)


def model_format(model: nn.Module) -> Optional[Format]:
    """The format a transformers model was loaded in (from its config), or None for an unquantized model."""
    for fmt in FORMATS:
        if fmt.model_is(model):
            return fmt
    return None


__all__ = ["FORMATS", "Format", "QuantState", "QuantWeights", "dequantize", "dispatch", "group_layout",
           "is_quantized_layer", "model_format", "prepare_model"]
