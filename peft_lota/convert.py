"""Lossless repacking of a quantized model from one format into another (e.g. for a server that takes only one).

Every quantized layer is read through its format (codes, zero points, scales, g_idx, bias) and rebuilt by the
target format (`Format.build_layer`) from exactly those values: the integer grid, the group order and the
dequantized weights do not change. A layer the target cannot hold as it is (act-order into AWQ, a width its
packing cannot fill, scales or a bias that its stored dtype would round) refuses the whole conversion before
any layer is replaced, with the reason.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from . import formats
from .formats.base import Format, QuantState

STORED_DTYPE = torch.float16  # the scales' (and bias') dtype of the GPTQ and AWQ layers built here


def _fits_dtype(t: Optional[torch.Tensor], dtype: torch.dtype) -> bool:
    return t is None or torch.equal(t.to(dtype).to(t.dtype), t)


def conversion_problem(name: str, state: QuantState, grid: dict, target: Format) -> Optional[str]:
    """Why layer `name` (its state and grid settings) cannot be stored in `target` without a change, or None."""
    K, N = state.in_features, state.scales.shape[1]
    gs = K if grid["group_size"] in (-1, 0) else grid["group_size"]
    act_order = not torch.equal(state.g_idx.long().cpu(), torch.arange(K) // gs)  # groups not in row order
    problem = target.grid_problem(K, N, grid["bits"], grid["group_size"], grid["sym"], act_order=act_order)
    if problem:
        return f"{name}: {problem}"
    if state.offsets is not None:
        return (f"{name}: its blocks add a float offset to every weight (GGUF's Q4_1/Q5_1 `m`), which {target.title} "
                "cannot store.")
    if state.scale_dtype != state.scales.dtype:
        return (f"{name}: its weights are float32 products of {state.scale_dtype} scales (GGUF), which "
                f"{target.title}'s kernels compute in {STORED_DTYPE} and would round.")
    if not _fits_dtype(state.scales, STORED_DTYPE):
        return f"{name}: its {state.scales.dtype} scales are not all exact in float16, the dtype {target.title} stores."
    if not _fits_dtype(state.bias, STORED_DTYPE):
        return f"{name}: its {state.bias.dtype} bias is not exact in float16, the dtype {target.title} stores."
    return None


def convert_model(model: nn.Module, to: str) -> nn.Module:
    """Repack every quantized layer of `model` (a transformers model loaded with `peft_lota.load_model`) into the
    format named `to`, in place, and give the model that format's quantization_config; returns the model. Its
    `save_pretrained` then writes a standard checkpoint of the new format (export/)."""
    source, target = formats.model_format(model), formats.by_name(to)
    if source is None:
        raise ValueError("convert repacks a quantized model; this one is full precision.")
    if source is target:
        raise ValueError(f"this model is {source.title} already: nothing to convert.")
    if not target.can_build:
        buildable = formats.format_list(buildable=True)
        raise ValueError(f"peft_lota cannot build {target.title} layers; it converts into {buildable}.")
    formats.prepare_model(model)
    layers = [(n, m) for n, m in model.named_modules() if formats.is_quantized_layer(m)]
    plans, problems, grids = [], [], set()
    for name, layer in layers:
        quant = formats.dispatch(layer, name)
        state, grid = quant.read(), quant.grid_settings()
        if state.scales.shape[0] == 1:  # one group per output column, however the format counts its size
            grid = {**grid, "group_size": -1}
        # symmetric is what the zero points are (all 2^(bits-1)), whatever the layer's flag says
        grid = {**grid, "sym": bool((state.zeros.long() == 1 << (grid["bits"] - 1)).all())}
        problem = conversion_problem(name, state, grid, target)
        if problem:
            problems.append(problem)
        grids.add((grid["bits"], grid["group_size"]))
        plans.append((name, state, grid))
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise ValueError(f"cannot convert into {target.title} without changing the model: {problems[0]}{more}")
    if len(grids) != 1:
        raise ValueError(f"the layers use several grids {sorted(grids)}; a {target.title} config holds one.")
    for name, state, grid in plans:
        new = target.build_layer(state.codes, state.zeros.to(torch.int32), state.scales.to(STORED_DTYPE),
                                 state.g_idx.to(torch.int32),
                                 None if state.bias is None else state.bias.to(STORED_DTYPE),
                                 grid["bits"], grid["group_size"], grid["sym"])
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, new.to(state.scales.device))
    bits, group_size = grids.pop()
    sym = all(g["sym"] for _, _, g in plans)
    qc = target.new_config(bits, group_size, sym)
    if "ignore" in qc:  # compressed-tensors targets every Linear: name the ones that stay in full precision
        qc["ignore"] = [n for n, m in model.named_modules()
                        if isinstance(m, nn.Linear) and not formats.is_quantized_layer(m)]
    model.config.quantization_config = qc
    from .export import attach_export

    return attach_export(model)


def same_grid(a: nn.Module, b: nn.Module) -> bool:
    """Whether two models' quantized layers hold the same codes, zero points, scales, g_idx and bias, layer by layer,
    whatever their formats."""
    def states(model):
        return {n: formats.dispatch(m, n).read() for n, m in model.named_modules() if formats.is_quantized_layer(m)}

    x, y = states(a), states(b)
    if x.keys() != y.keys():
        return False
    for n in x:
        s, t = x[n], y[n]
        if not (torch.equal(s.codes, t.codes) and torch.equal(s.zeros.to(torch.int32), t.zeros.to(torch.int32))
                and torch.equal(s.scales.float(), t.scales.float()) and torch.equal(s.g_idx.long(), t.g_idx.long())
                and (s.bias is None) == (t.bias is None)
                and (s.bias is None or torch.equal(s.bias.float(), t.bias.float()))):
            return False
    return True
