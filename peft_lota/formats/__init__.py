"""Quantized-layer formats: read codes, zeros and scales, and write merged ones back.

Each format is one file with its `dispatch_<format>` and a `FORMAT` descriptor (base.Format); the
functions here ask every registered format in turn, so no caller chains if/else over formats.
"""

from __future__ import annotations

from typing import Optional

from torch import nn

from . import awq, bnb_int8, compressed_tensors, gguf, gptq
from .base import Format, MissingLibraryError, QuantState, QuantWeights, dequantize, group_layout, model_quantization_config

FORMATS: tuple[Format, ...] = (gptq.FORMAT, awq.FORMAT, compressed_tensors.FORMAT, bnb_int8.FORMAT, gguf.FORMAT)


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


def config_format(qc: Optional[dict]) -> Optional[Format]:
    """The format of a quantization_config (dict), or None if it is none we read (or there is none)."""
    return next((fmt for fmt in FORMATS if fmt.matches(qc or {})), None)


def unsupported_reason(qc: Optional[dict]) -> str:
    """Why a quantization_config is not one peft_lota can adapt, and what to use instead."""
    qc = qc or {}
    method = qc.get("quant_method")
    readable = format_list()
    built = format_list(buildable=True)
    if method == "bitsandbytes" and (qc.get("load_in_4bit") or qc.get("_load_in_4bit")):
        kind = str(qc.get("bnb_4bit_quant_type", "nf4")).upper()
        return (f"this model is quantized with bitsandbytes {kind}, a non-uniform grid (a table of values, not "
                "integer steps of one scale): moving a code by one does not change a weight by a fixed amount, so "
                "no update can merge into it exactly. Start from the full-precision model instead (a method that "
                f"quantizes while training writes a {built} model), or from a {readable} checkpoint.")
    return (f"quantization method {method!r} is not a format peft_lota reads ({readable}). Start from the "
            f"full-precision model (a method that quantizes while training writes a {built} model), or from a "
            f"{readable} checkpoint.")


def format_list(buildable: bool = False, sep: str = ", ") -> str:
    """The formats peft_lota reads (or those it can build new layers of), as messages name them: "GPTQ, AWQ, ..." """
    return sep.join(fmt.title for fmt in FORMATS if fmt.can_build or not buildable)


DEFAULT_BUILD = "gptq"  # the format new layers are written in when nothing names one (the most widely served)


def default_build_format() -> Format:
    """The format a model quantized from full precision is written in unless the user names one."""
    return by_name(DEFAULT_BUILD)


def by_name(name: str) -> Format:
    """The format called `name` ("gptq", "awq", ...); an unknown name is refused with the list."""
    for fmt in FORMATS:
        if fmt.name == name:
            return fmt
    raise ValueError(f"unknown format {name!r}; peft_lota's formats are {', '.join(f.name for f in FORMATS)}.")


# The tensors that hold a quantized model's codes and grid, in any format (buffers for GPTQ/AWQ, parameters for
# compressed-tensors): what a reloaded checkpoint must match exactly.
QUANT_TENSOR_NAMES = ("qweight", "qzeros", "scales", "g_idx", "weight_packed", "weight_scale", "weight_shape",
                      "qblocks")


def quantized_tensors(model: nn.Module) -> dict:
    """{name: tensor} of every codes/zeros/scales/g_idx tensor of `model`'s quantized layers."""
    named = [*model.named_buffers(), *model.named_parameters()]
    out = {n: t for n, t in named if n.rsplit(".", 1)[-1] in QUANT_TENSOR_NAMES}
    for name, layer in bnb_int8.int8_layers(model):  # LLM.int8 keeps CB and SCB outside buffers, after a forward
        snap = bnb_int8.Int8Weights(layer).snapshot()
        out.update({f"{name}.CB": snap["CB"], f"{name}.SCB": snap["SCB"]})
    return out


def same_quantized_tensors(a: nn.Module, b: nn.Module) -> bool:
    """Whether two models hold exactly the same quantized tensors, under the same names (e.g. merged and reloaded)."""
    import torch

    x, y = quantized_tensors(a), quantized_tensors(b)
    return x.keys() == y.keys() and all(torch.equal(x[k].cpu(), y[k].cpu()) for k in x)


def model_format(model: nn.Module) -> Optional[Format]:
    """The format a transformers model was loaded in (from its config), or None for an unquantized model."""
    for fmt in FORMATS:
        if fmt.model_is(model):
            return fmt
    return None


__all__ = ["DEFAULT_BUILD", "FORMATS", "Format", "MissingLibraryError", "default_build_format", "QuantState", "QuantWeights", "by_name", "config_format", "dequantize", "dispatch",
           "format_list", "group_layout", "is_quantized_layer", "model_format", "model_quantization_config",
           "prepare_model", "quantized_tensors", "same_quantized_tensors", "unsupported_reason"]
