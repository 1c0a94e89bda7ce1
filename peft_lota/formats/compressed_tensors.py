"""compressed-tensors' `pack-quantized` integer format (llm-compressor's W4A16 / W8A16, what vLLM serves), as
transformers loads it: codec, layout check, reading and writing codes, dispatch, checkpoints.

A layer stays a plain `nn.Linear` carrying, instead of `weight`: `weight_packed` int32 [N, K*b/32] (codes
q in [-2^(b-1), 2^(b-1)) stored as u = q + 2^(b-1), one little-endian bit stream along each row, i.e.
formats/packing.py's convention along dim 1), `weight_scale` [N, G] (G groups of contiguous input columns;
one for the `channel` strategy) and `weight_shape` [2]; `quantization_scheme` describes the grid. The weight
is W = (q - zp) * s, computed in the scales' dtype, and the layer's output is `F.linear(x, W, bias)`.

How transformers (5.x) runs such a model: after loading, the layers stay compressed and a forward pre-hook on
the model (`ct_decompress_hook`) decompresses every layer into a dense `weight` at the first forward. We keep
the layers compressed instead: `prepare_ct_model` removes that hook and gives each compressed layer a forward
that computes exactly what the decompressed layer would (the same W, the same `F.linear` call), from its
codes, on every call; merges then write new codes into `weight_packed`, and the checkpoint is the model's own
state dict with its compressed-tensors quantization_config.

Supported: integer weights of 2, 3, 4 or 8 bits, symmetric, `group` or `channel` strategy, no activation
quantization, no act-order (`weight_g_idx`). Asymmetric pack-quantized checkpoints are refused: stock
transformers cannot load them (their packed zero points do not fit the shapes it allocates).
"""

from __future__ import annotations

import logging
import types
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .base import (BuildsLayers, Format, QuantState, QuantWeights, Streams, group_layout, layers_of, nk_linear,
                   problems_error)
from .base import model_quantization_config as quantization_config
from . import serving
from .packing import SUPPORTED_BITS, pack_codes, unpack_codes

logger = logging.getLogger(__name__)

NAME = "compressed-tensors"
QUANT_METHOD = "compressed-tensors"
RELOAD_HINT = ("Load the model again with AutoModelForCausalLM.from_pretrained(path) (peft_lota.load_model) and "
               "call get_peft_model (or merge) before running inference with it: the first forward of a stock "
               "compressed-tensors model decompresses every layer into a dense weight.")
_FORWARD_TAG = "_peft_lota_ct_forward"


# ---- codec: pure functions ------------------------------------------------------------------------------

def unpack_weight(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """`weight_packed` int32 [N, K*b/32] -> unsigned codes uint8 [K, N] (u = q + 2^(b-1)).

    Transposed, the words are GPTQ's `qweight` layout (each column of [K, N] a bit stream along K): transposing
    the packed words (1/8 of the codes' bytes at 4 bits) lets the fast packed-dimension-first decoder run."""
    return unpack_codes(packed.t().contiguous(), bits, dim=0)


def pack_weight(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned codes [K, N] -> `weight_packed` int32 [N, K*b/32]."""
    return pack_codes(codes, bits, dim=0).t().contiguous()


# ---- layers --------------------------------------------------------------------------------------------

def is_ct_layer(module: nn.Module) -> bool:
    return (isinstance(module, nn.Linear) and getattr(module, "quantization_scheme", None) is not None
            and hasattr(module, "weight_packed"))


def ct_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return layers_of(model, is_ct_layer)


def _value(x):
    return getattr(x, "value", x)


def layout_problem(name: str, module: nn.Module) -> Optional[str]:
    """Why this layer is not one we read and write exactly, or None if it is."""
    scheme = module.quantization_scheme
    w = scheme.weights
    if w is None or _value(w.type) != "int":
        return f"layer {name} does not hold integer weights ({getattr(w, 'type', None)})."
    if w.num_bits not in SUPPORTED_BITS:
        return f"layer {name} holds {w.num_bits}-bit codes; peft_lota supports {SUPPORTED_BITS}-bit weights."
    if scheme.input_activations is not None or scheme.output_activations is not None:
        return (f"layer {name} also quantizes its activations (W{w.num_bits}A{scheme.input_activations.num_bits}): "
                "peft_lota adapts weight-only schemes (W4A16, W8A16).")
    strategy = _value(w.strategy)
    if strategy not in ("group", "channel"):
        return f"layer {name} uses the {strategy!r} strategy; peft_lota reads 'group' and 'channel'."
    if not w.symmetric or hasattr(module, "weight_zero_point"):
        return f"layer {name} is asymmetric; peft_lota reads symmetric pack-quantized layers (what W4A16 makes)."
    if hasattr(module, "weight_g_idx"):
        return f"layer {name} uses act-order (weight_g_idx), which peft_lota does not read for compressed-tensors."
    if hasattr(module, "weight") and isinstance(getattr(module, "weight"), torch.Tensor):
        return f"layer {name} has been decompressed into a dense weight."
    K, N, b = module.in_features, module.out_features, w.num_bits
    if (K * b) % 32:
        return f"layer {name}: {K} input columns of {b}-bit codes do not fill whole int32 words."
    G = module.weight_scale.shape[-1] if module.weight_scale.dim() == 2 else 1
    if tuple(module.weight_packed.shape) != (N, K * b // 32) or tuple(module.weight_scale.shape) != (N, G) or K % G:
        return f"layer {name} has buffers of non-standard shapes."
    return None


def model_is_ct(model: nn.Module) -> bool:
    qc = quantization_config(model)
    return qc is not None and qc.get("quant_method") == QUANT_METHOD


def _compressed_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """What the decompressed layer computes, from the codes: F.linear(x, (q - 0) * s, bias) in the scales' dtype.
    (A layer peft_lota built holds float32 scales: its weight, exact in float32, is rounded once to x's dtype, which
    is the product a reload in that dtype computes.)"""
    state = self._peft_lota_weights.read()  # one reader per layer: its zeros/g_idx metadata is decoded once
    return F.linear(x, state.weight().t().contiguous().to(x.dtype), self.bias)


def prepare_ct_model(model: nn.Module) -> int:
    """Keep `model`'s compressed-tensors layers compressed: remove the decompress-on-first-forward hook and give
    every such layer an exact forward from its codes. Returns how many layers it changed."""
    layers = ct_layers(model)
    if not layers:
        return 0
    problems = [p for n, m in layers if (p := layout_problem(n, m))]
    if problems:
        raise problems_error("peft_lota cannot use this model's compressed-tensors layers", problems, RELOAD_HINT)
    for m in model.modules():
        hook = getattr(m, "ct_decompress_hook", None)
        if hook is not None:
            hook.remove()
            delattr(m, "ct_decompress_hook")
    changed = sum(_keep_compressed(module) for _, module in layers)
    if changed:
        logger.info("peft_lota: %d compressed-tensors layers stay compressed (computed from their codes).", changed)
    return changed


def _keep_compressed(module: nn.Module) -> bool:
    """Give a compressed layer the exact forward from its codes; False if it has it already."""
    module.weight_scale.requires_grad_(False)  # transformers makes it a trainable Parameter
    if getattr(module, _FORWARD_TAG, False):
        return False
    module._peft_lota_weights = CTWeights(module)
    module.forward = types.MethodType(_compressed_forward, module)
    setattr(module, _FORWARD_TAG, True)
    return True


# ---- building a layer (convert into compressed-tensors) ----------------------------------------------------

def grid_problem(in_features: int, out_features: int, bits: int, group_size: int, sym: bool,
                 act_order: bool = False) -> Optional[str]:
    """Why a new pack-quantized layer [in_features, out_features] with this grid cannot be stored, or None."""
    gs = in_features if group_size in (-1, 0) else group_size
    if act_order:
        return ("act-order (a permuted g_idx) is compressed-tensors' actorder='group', which peft_lota does not write "
                "and vLLM (0.34) refuses.")
    if not sym:
        return ("it has zero points, and transformers (5.23) cannot load an asymmetric pack-quantized checkpoint (its "
                "packed zero points do not fit the shapes it allocates), so the result could not be checked by a stock "
                "reload. For vLLM, 4-bit grids with zero points convert to AWQ (--to awq).")
    if bits not in SUPPORTED_BITS:
        return f"compressed-tensors layers here hold {SUPPORTED_BITS}-bit codes, not {bits}."
    if (in_features * bits) % 32:
        return (f"pack-quantized packs codes along the input, and {in_features} rows of {bits} bits do not fill int32 "
                "words.")
    if in_features % gs:
        return f"groups are whole runs of input rows, and in_features={in_features} is not a multiple of {gs}."
    return None


def _weights_args(bits: int, group_size: int) -> dict:
    strategy = dict(strategy="channel", group_size=None) if group_size in (-1, 0) else dict(strategy="group",
                                                                                             group_size=group_size)
    return dict(num_bits=bits, type="int", symmetric=True, dynamic=False, actorder=None, **strategy)


def build_layer(codes: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor, bias,
                bits: int, group_size: int, sym: bool) -> nn.Module:
    """A pack-quantized layer (as transformers loads one, kept compressed) holding these codes [K, N], scales
    [G, N] and bias; the zero points must be the symmetric 2^(bits-1) and `g_idx` the contiguous k // group_size."""
    K, N = codes.shape
    gs = K if group_size in (-1, 0) else group_size
    if not torch.equal(g_idx.long().cpu(), torch.arange(K) // gs):
        raise ValueError("compressed-tensors layers here have contiguous groups of input rows: this grid's g_idx "
                         "(act-order) cannot be stored.")
    if not bool((zeros.long() == 1 << (bits - 1)).all()):
        raise ValueError("compressed-tensors layers here are symmetric: this grid's zero points cannot be stored.")
    return _layer({"weight_packed": pack_weight(codes, bits).to(codes.device),
                   "weight_scale": scales.detach().t().float().contiguous(),  # exact for fp16 and bf16 scales
                   "weight_shape": torch.tensor([N, K], dtype=torch.int64),
                   **({} if bias is None else {"bias": bias.detach().clone().to(scales.dtype)})},
                  _weights_args(bits, group_size))


def _layer(tensors: dict, weights: dict) -> nn.Module:
    """A compressed layer, as transformers loads one and kept compressed, holding a layer's checkpoint tensors."""
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme, QuantizationStatus

    N, K = (int(v) for v in tensors["weight_shape"])
    layer = nn.Linear(K, N, bias="bias" in tensors, device="meta")
    del layer.weight
    for name, t in tensors.items():  # transformers holds them as Parameters
        setattr(layer, name, nn.Parameter(t, requires_grad=False))
    layer.quantization_scheme = QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(**weights))
    layer.quantization_status = QuantizationStatus.COMPRESSED
    _keep_compressed(layer)
    return layer.eval()


# ---- streaming (merge --stream): one layer from, and back to, its checkpoint tensors -------------------------

LAYER_TENSORS = ("weight_packed", "weight_scale", "weight_shape", "bias")


def _only_weights(qc: dict) -> dict:
    ws = _weight_args(qc)
    if len(ws) != 1:
        raise ValueError(f"this checkpoint has {len(ws)} quantization groups; the streaming merge reads one "
                         "(what llm-compressor's W4A16 / W8A16 write): merge in memory.")
    return {k: v for k, v in ws[0].items() if v is not None}


def layer_from_tensors(tensors: dict, qc: dict) -> nn.Module:
    """A compressed layer holding one layer's checkpoint tensors ({"weight_packed": ..., "weight_scale": ...})."""
    layer = _layer({k: v for k, v in tensors.items() if k in LAYER_TENSORS}, _only_weights(qc))
    problem = layout_problem("this layer", layer)
    if problem:
        raise ValueError(problem)
    return layer


def layer_tensors(layer: nn.Module, qc_out: dict) -> dict:
    """One layer's tensors as a pack-quantized checkpoint stores them (as they are in memory)."""
    return {name: getattr(layer, name).data for name in LAYER_TENSORS if getattr(layer, name, None) is not None}


def true_zeros_of(tensors: dict, qc: dict) -> torch.Tensor:
    """Zero points [G, N]: all 2^(bits-1) (symmetric layers store none)."""
    N, G = tensors["weight_scale"].shape
    return torch.full((G, N), 1 << (int(_only_weights(qc)["num_bits"]) - 1), dtype=torch.uint8)


def checkpoint_config(qc: dict, fits: bool, still_sym: bool) -> tuple[dict, dict, dict]:
    """(quantization_config, extra files, facts) of a checkpoint written from a model loaded with `qc`: the same
    config (symmetric layers hold no zero points, so a merge cannot have moved one)."""
    qc["quantization_status"] = "compressed"
    return qc, {}, {"format": "compressed-tensors", "fast_path_note": fast_path_note(qc)}


def new_config(bits: int, group_size: int, sym: bool) -> dict:
    """The `config.quantization_config` of a pack-quantized model made by peft_lota (what llm-compressor writes for
    W4A16, every Linear but lm_head; convert names the full-precision layers it finds in `ignore`)."""
    import compressed_tensors

    group = {"format": "pack-quantized", "targets": ["Linear"], "input_activations": None,
             "output_activations": None, "weights": _weights_args(bits, group_size)}
    return {"quant_method": QUANT_METHOD, "format": "pack-quantized", "quantization_status": "compressed",
            "config_groups": {"group_0": group}, "ignore": ["lm_head"], "kv_cache_scheme": None,
            "global_compression_ratio": None, "sparsity_config": {}, "transform_config": {},
            "version": compressed_tensors.__version__}


# ---- reading and writing one layer ---------------------------------------------------------------------

class CTWeights(QuantWeights):
    """Codes and scales of a symmetric pack-quantized compressed-tensors layer."""

    format_name = NAME
    fixed_zero_points = True
    fuses_bias = True  # nn.Linear adds the bias inside its addmm

    def __init__(self, layer: nn.Module):
        super().__init__(layer)
        self.in_features, self.out_features = layer.in_features, layer.out_features
        self.bits = int(layer.quantization_scheme.weights.num_bits)

    @property
    def device(self) -> torch.device:
        return self.layer.weight_packed.device

    @property
    def group_size(self) -> int:
        return self.in_features // self.layer.weight_scale.shape[-1]

    def read(self) -> QuantState:
        base, bits = self.layer, self.bits
        packed = base.weight_packed.detach()
        per_word = 32 // bits if bits != 3 else 32  # whole words per row chunk (3 bits: 32 codes in 3 words)

        def codes_rows(k0: int, k1: int) -> torch.Tensor:
            return unpack_weight(packed[:, k0 * bits // 32:k1 * bits // 32], bits)

        zeros, g_idx, layout = self._metadata()
        return QuantState(None, zeros, base.weight_scale.detach().t(), g_idx, self.maxq, base.bias,
                          codes_rows=codes_rows, in_features=self.in_features, row_align=per_word, layout=layout,
                          linear=nk_linear)

    def _metadata(self):
        cached = self.__dict__.get("_meta")
        G = self.layer.weight_scale.shape[-1]
        if cached is None or cached[0] != G:
            zeros = torch.full((G, self.out_features), 1 << (self.bits - 1), dtype=torch.uint8, device=self.device)
            g_idx = torch.arange(self.in_features, device=self.device) // (self.in_features // G)
            cached = self.__dict__["_meta"] = (G, zeros, g_idx, group_layout(g_idx, G))
        return cached[1:]

    def grid_settings(self) -> dict:
        return {"bits": self.bits, "group_size": self.group_size, "sym": True}

    def encode(self, codes: torch.Tensor, zeros: torch.Tensor, scales: Optional[torch.Tensor] = None
               ) -> dict[str, torch.Tensor]:
        base = self.layer
        if not bool((zeros == 1 << (self.bits - 1)).all()):
            raise ValueError("compressed-tensors' symmetric layers have no zero points to move (an update that moves "
                             "zero points cannot be written into them).")
        out = {"weight_packed": pack_weight(codes, self.bits).to(base.weight_packed.device)}
        if scales is not None:
            out["weight_scale"] = scales.detach().t().to(base.weight_scale.dtype).to(base.weight_scale.device
                                                                                       ).contiguous()
        return out

    def snapshot(self) -> dict[str, torch.Tensor]:
        base = self.layer
        return {"weight_packed": base.weight_packed.data, "weight_scale": base.weight_scale.data}

    def restore(self, buffers: dict[str, torch.Tensor]) -> None:
        for name, value in buffers.items():
            getattr(self.layer, name).data = value  # swaps the storage: no copy, the snapshot stays intact


def dispatch_compressed_tensors(module: nn.Module, name: str = "") -> Optional[CTWeights]:
    """The CTWeights of a compressed-tensors pack-quantized layer, or None if `module` is not one."""
    if not is_ct_layer(module):
        return None
    problem = layout_problem(name or type(module).__name__, module)
    if problem:
        raise ValueError(problem + " " + RELOAD_HINT)
    return CTWeights(module)


# ---- a standard checkpoint of a whole model --------------------------------------------------------------

def ct_checkpoint(model: nn.Module) -> tuple[dict, dict, dict, dict]:
    """(state_dict, quantization_config, extra files, facts) of a compressed-tensors pack-quantized checkpoint:
    the layers' own tensors (weight_packed, weight_scale, weight_shape) and the model's quantization_config."""
    qc = quantization_config(model)
    if qc is None or qc.get("quant_method") != QUANT_METHOD:
        raise ValueError("A compressed-tensors checkpoint needs a model loaded from one (quant_method "
                         "'compressed-tensors').")
    layers = ct_layers(model)
    if not layers:
        raise ValueError("This model has no compressed pack-quantized layers (was it decompressed by a forward "
                         "before peft_lota prepared it?); nothing to write as a compressed-tensors checkpoint.")
    problems = [p for n, m in layers if (p := layout_problem(n, m))]
    if problems:
        raise problems_error("Cannot write a compressed-tensors checkpoint from this model", problems, RELOAD_HINT)
    qc["quantization_status"] = "compressed"
    state_dict = model.state_dict()
    # A model loaded in float32 holds its (bf16 or fp16) scales widened: store them back in the narrowest 16-bit
    # dtype that holds every one exactly, as a server running in that dtype will use them. Scales trained in
    # float32 stay float32 (exact), with a warning.
    scale_dtype = next((d for d in (torch.bfloat16, torch.float16)
                        if all(torch.equal(m.weight_scale.to(d).to(m.weight_scale.dtype), m.weight_scale)
                               for _, m in layers)), None)
    if scale_dtype is not None:
        for name, _ in layers:
            key = f"{name}.weight_scale"
            state_dict[key] = state_dict[key].to(scale_dtype)
    elif any(m.weight_scale.dtype == torch.float32 for _, m in layers):
        logger.warning("peft_lota: this model's scales (trained in float32) are written as float32; a server that "
                       "casts them to bf16/fp16 rounds them. For bit-exact serving in 16 bits, train in that dtype "
                       "(load the model with dtype=torch.bfloat16) or keep the scales fixed (train_scales=False).")
    bits = sorted({int(m.quantization_scheme.weights.num_bits) for _, m in layers})
    groups = sorted({m.in_features // m.weight_scale.shape[-1] for _, m in layers})
    dtypes = sorted({str(state_dict[f"{n}.weight_scale"].dtype).removeprefix("torch.") for n, _ in layers})
    serving = [k for k, _, ok in kernels(qc) if ok]
    facts = {"format": "compressed-tensors", "bits": "/".join(map(str, bits)),
             "group_size": "/".join(map(str, groups)), "desc_act": False, "sym": True,
             "checkpoint_format": "pack-quantized",
             "loaders": "Needs `compressed-tensors` installed (transformers loads the format through it). Scales "
                        f"stored as {', '.join(dtypes)}. Kernels that can serve it: " + (", ".join(serving) or "none known")
                        + ".",
             "kernels": serving, "fast_path_note": fast_path_note(qc)}
    return state_dict, qc, {}, facts


def _weight_args(qc: dict) -> list[dict]:
    return [g.get("weights") or {} for g in (qc.get("config_groups") or {}).values()]


def _serving_grid(w: dict) -> serving.Grid:
    """One config group's weights as the servers' rules read them; ok=False for what they do not describe (float or
    dynamic weights, a strategy other than group or channel, act-order per channel)."""
    strategy = w.get("strategy")
    grouped = strategy == "channel" or (strategy == "group" and (w.get("group_size") or -1) > 0)
    act_order = w.get("actorder") in ("group", "dynamic")
    # (compressed-tensors itself refuses act-order per channel: it orders groups)
    ok = w.get("type", "int") == "int" and grouped and not w.get("dynamic") and not (act_order and strategy == "channel")
    return serving.Grid(int(w.get("num_bits") or 0), int(w["group_size"]) if strategy == "group" and ok else -1,
                        w.get("symmetric", True) is not False, act_order, ok)


def kernels(qc: dict) -> list[tuple[str, str, bool]]:
    """(kernel, devices, can serve) for a pack-quantized config: transformers' dense fallback everywhere, and the GPU
    servers' WNA16 schemes (serving.py), which must take every config group."""
    grids = [_serving_grid(w) for w in _weight_args(qc)] or [serving.Grid(0, -1, True, False, False)]
    per_group = [serving.rows("compressed-tensors", g) for g in grids]  # each: one (kernel, devices, ok) per server
    return [("transformers (decompressed to dense on first forward)", "cpu, cuda", True)] + [
        (name, devices, all(rows[i][2] for rows in per_group)) for i, (name, devices, _) in enumerate(per_group[0])]


def fast_path_note(qc: dict) -> Optional[str]:
    """Which GPU server refuses these weights, why, and the conversion it serves; or None (transformers runs any
    of them decompressed)."""
    notes = [serving.note("compressed-tensors", _serving_grid(w)) for w in _weight_args(qc)]
    return " ".join(dict.fromkeys(n for n in notes if n)) or None


def load_config(qc: dict):
    return None  # transformers' own compressed-tensors loading keeps the layers compressed


def describe(qc: dict) -> list[tuple[str, object]]:
    ws = _weight_args(qc)
    return [("kind", "compressed-tensors checkpoint"), ("format", qc.get("format")),
            ("bits", ", ".join(str(w.get("num_bits")) for w in ws)),
            ("strategy", ", ".join(f"{w.get('strategy')} {w.get('group_size') or ''}".strip() for w in ws)),
            ("symmetric", all(w.get("symmetric", True) for w in ws))]


class CompressedTensorsFormat(BuildsLayers, Streams, Format):
    name, quant_method = NAME, QUANT_METHOD
    requires = (("compressed_tensors", "compressed-tensors"),)
    # a reload casts the scales to the model's dtype, where trained float32 scales would round
    reload_keeps_scale_dtype = False
    layer_tensor_names = LAYER_TENSORS
    is_layer, dispatch = staticmethod(is_ct_layer), staticmethod(dispatch_compressed_tensors)
    prepare_model = staticmethod(prepare_ct_model)
    model_is = staticmethod(model_is_ct)
    checkpoint = staticmethod(ct_checkpoint)
    load_config, kernels, describe = staticmethod(load_config), staticmethod(kernels), staticmethod(describe)
    fast_path_note = staticmethod(fast_path_note)
    grid_problem = staticmethod(grid_problem)
    build_layer = staticmethod(build_layer)
    new_config = staticmethod(new_config)
    layer_from_tensors, layer_tensors = staticmethod(layer_from_tensors), staticmethod(layer_tensors)
    true_zeros_of, checkpoint_config = staticmethod(true_zeros_of), staticmethod(checkpoint_config)


FORMAT = CompressedTensorsFormat()
