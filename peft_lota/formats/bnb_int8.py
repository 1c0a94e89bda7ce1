"""bitsandbytes LLM.int8 (`Linear8bitLt`, what `BitsAndBytesConfig(load_in_8bit=True)` loads): reading and
writing its codes, dispatch, checkpoints.

A layer holds `CB` int8 [N, K] (in `weight.data`, and in `state.CB` after its first forward) and `SCB` float32 [N],
each row's absolute maximum: W = CB * SCB / 127, a symmetric 8-bit grid with one scale per output row. We read it as
unsigned codes u = CB + 128 with zero point 128 and scale s = SCB * (1/127) (bitsandbytes' own product, in float32),
one group spanning the whole row.

Its forward is not x @ W: in eval mode bitsandbytes quantizes the activations per token to int8 and sends
outlier columns (|x| > llm_int8_threshold) through a float16 path (MatMul8bitLt); in training mode on CPU it
dequantizes and multiplies (MatMul8bitFp). An adapted layer therefore runs bitsandbytes' own matmul on the adapted
codes (`Int8Weights.read` gives the state a `linear` that does), so that it computes exactly what the merged layer
will, in either mode; its gradients are the adapting method's own, through the dequantized weight.
"""

from __future__ import annotations

import logging
from typing import Optional

import torch
from torch import nn

from .base import Format, QuantState, QuantWeights, Streams, group_layout, layers_of
from .base import model_quantization_config as quantization_config

logger = logging.getLogger(__name__)

NAME = "bitsandbytes-int8"
ZERO = 128  # u = CB + 128


def _linear8bit_class():
    import bitsandbytes as bnb

    return bnb.nn.Linear8bitLt


def is_int8_layer(module: nn.Module) -> bool:
    try:
        cls = _linear8bit_class()
    except ImportError:  # bitsandbytes not installed: no such layer can exist
        return False
    return isinstance(module, cls) and not module.state.has_fp16_weights


def int8_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return layers_of(model, is_int8_layer)


def _cb(layer: nn.Module) -> torch.Tensor:
    """CB wherever this layer keeps it: `state.CB` after its first forward, `weight.CB` before (which the first forward
    moves to the state), else `weight.data`."""
    if layer.state.CB is not None:
        return layer.state.CB
    cb = getattr(layer.weight, "CB", None)
    return cb if cb is not None else layer.weight.data


def _scb(layer: nn.Module) -> torch.Tensor:
    scb = layer.state.SCB if layer.state.SCB is not None else getattr(layer.weight, "SCB", None)
    if scb is None:
        raise ValueError("this Linear8bitLt layer has no SCB: it was not quantized (load the model with "
                         "BitsAndBytesConfig(load_in_8bit=True)).")
    return scb


def model_is_int8(model: nn.Module) -> bool:
    return config_is_int8(quantization_config(model) or {})


def config_is_int8(qc: dict) -> bool:
    return qc.get("quant_method") == "bitsandbytes" and bool(qc.get("load_in_8bit") or qc.get("_load_in_8bit"))


def prepare_int8_model(model: nn.Module) -> int:
    return 0  # the stock layers are read and written as they are


class Int8Weights(QuantWeights):
    """Codes and row scales of a bitsandbytes Linear8bitLt layer."""

    format_name = NAME
    fixed_zero_points = True
    fuses_bias = True  # bitsandbytes adds the bias inside its matmul

    def __init__(self, layer: nn.Module):
        super().__init__(layer)
        self.in_features, self.out_features, self.bits = layer.in_features, layer.out_features, 8

    @property
    def device(self) -> torch.device:
        return _cb(self.layer).device

    def read(self) -> QuantState:
        layer = self.layer
        cb, scb = _cb(layer), _scb(layer)

        def codes_rows(k0: int, k1: int) -> torch.Tensor:  # rows k0..k1-1 of [K, N], contiguous
            return cb[:, k0:k1].t().contiguous().view(torch.uint8).add_(ZERO)  # int8 + 128 (mod 256) = u

        zeros = torch.full((1, self.out_features), ZERO, dtype=torch.uint8, device=cb.device)
        scales = scb.float().mul(1.0 / 127.0).unsqueeze(0)  # bitsandbytes' s, [1, N]
        g_idx = torch.zeros(self.in_features, dtype=torch.long, device=cb.device)
        return QuantState(None, zeros, scales, g_idx, self.maxq, layer.bias, codes_rows=codes_rows,
                          in_features=self.in_features, layout=group_layout(g_idx, 1),
                          linear=self._linear(scales, scb))

    def _linear(self, base_scales: torch.Tensor, base_scb: torch.Tensor):
        layer = self

        def int8_linear(x, weight, bias, codes=None, zeros=None, scales=None):
            """bitsandbytes' matmul on these codes and scales (its int8 path in eval mode, its dequantized one in
            training mode), as the merged layer will run it."""
            import bitsandbytes as bnb

            if codes is None:
                raise ValueError("LLM.int8 layers compute from their codes; this caller gave only a weight.")
            cb, scb = layer.encoded(codes, zeros, scales, base_scales, base_scb)
            state = bnb.MatmulLtState()
            state.CB, state.SCB, state.threshold = cb, scb, layer.layer.state.threshold
            state.has_fp16_weights, state.is_training = False, layer.layer.training
            if bias is not None and bias.dtype != x.dtype:
                bias = bias.to(x.dtype)
            return bnb.matmul(x, cb, bias=bias, state=state)

        return int8_linear

    def encoded(self, codes, zeros, scales, base_scales, base_scb) -> tuple[torch.Tensor, torch.Tensor]:
        """(CB, SCB) holding these codes [K, N] and scales [1, N]; SCB stays the layer's own while the scales do."""
        if zeros is not None and not bool((zeros == ZERO).all()):
            raise ValueError("LLM.int8 layers are symmetric: their zero points cannot move (an update that moves "
                             "zero points cannot be written into them).")
        cb = codes.t().clone(memory_format=torch.contiguous_format).sub_(ZERO).view(torch.int8)  # u - 128 (mod 256)
        if scales is None or torch.equal(scales.float(), base_scales):
            scb = base_scb
        else:
            scb = (scales.float() * 127.0).reshape(-1).contiguous()
        return cb, scb

    def grid_settings(self) -> dict:
        return {"bits": 8, "group_size": -1, "sym": True}

    def kernel_input(self, x: torch.Tensor) -> torch.Tensor:
        bias = self.layer.bias
        if bias is not None and bias.dtype != x.dtype:  # Linear8bitLt.forward's own in-place cast
            bias.data = bias.data.to(x.dtype)
        return x

    def encode(self, codes: torch.Tensor, zeros: torch.Tensor, scales: Optional[torch.Tensor] = None
               ) -> dict[str, torch.Tensor]:
        scb = _scb(self.layer)
        base_scales = scb.float().mul(1.0 / 127.0).unsqueeze(0)
        cb, new_scb = self.encoded(codes, zeros, scales, base_scales, scb)
        return {"CB": cb, "SCB": new_scb}

    def snapshot(self) -> dict[str, torch.Tensor]:
        return {"CB": _cb(self.layer), "SCB": _scb(self.layer)}

    def restore(self, buffers: dict[str, torch.Tensor]) -> None:
        layer = self.layer
        # every place the layer may read them from: the first forward moves weight.CB/SCB to its state
        if "CB" in buffers:
            layer.weight.data = buffers["CB"]
            if getattr(layer.weight, "CB", None) is not None:
                layer.weight.CB = buffers["CB"]
            if layer.state.CB is not None:
                layer.state.CB = buffers["CB"]
        if "SCB" in buffers:
            if layer.state.SCB is not None:
                layer.state.SCB = buffers["SCB"]
            if getattr(layer.weight, "SCB", None) is not None:
                layer.weight.SCB = buffers["SCB"]


def dispatch_int8(module: nn.Module, name: str = "") -> Optional[Int8Weights]:
    """The Int8Weights of a bitsandbytes Linear8bitLt layer, or None if `module` is not one."""
    if not is_int8_layer(module):
        return None
    _scb(module)  # raises with the way out if the layer was never quantized
    return Int8Weights(module)


def int8_checkpoint(model: nn.Module) -> tuple[dict, dict, dict, dict]:
    """(state_dict, quantization_config, extra files, facts) of an LLM.int8 checkpoint: each layer's CB (as `weight`),
    SCB and weight_format, as bitsandbytes saves them."""
    qc = quantization_config(model)
    if qc is None or not config_is_int8(qc):
        raise ValueError("An LLM.int8 checkpoint needs a model loaded with BitsAndBytesConfig(load_in_8bit=True).")
    layers = int8_layers(model)
    if not layers:
        raise ValueError("This model has no bitsandbytes Linear8bitLt layers; nothing to write as LLM.int8.")
    state_dict = model.state_dict()
    for name, layer in layers:  # CB and SCB from wherever the layer keeps them now
        state_dict.update({f"{name}.{k}": v for k, v in layer_tensors(layer, qc).items()})
    facts = {"format": "bitsandbytes LLM.int8", "bits": 8, "group_size": -1, "desc_act": False, "sym": True,
             "checkpoint_format": "int8 row-wise",
             "loaders": "Needs `bitsandbytes` installed; transformers loads it with its stored quantization_config.",
             "kernels": [k for k, _, ok in kernels(qc) if ok], "fast_path_note": None, "serialized_as_loaded": True}
    return state_dict, qc, {}, facts


# ---- streaming (merge --stream): one layer from, and back to, its checkpoint tensors -------------------------

LAYER_TENSORS = ("weight", "SCB", "weight_format", "bias")


def layer_from_tensors(tensors: dict, qc: dict) -> nn.Module:
    """A Linear8bitLt holding one layer's checkpoint tensors (CB as `weight`, SCB), as transformers loads one."""
    import bitsandbytes as bnb

    cb, scb = tensors["weight"], tensors["SCB"]
    if cb.dtype != torch.int8:
        raise ValueError(f"this LLM.int8 layer's weight is {cb.dtype}, not int8 codes: not a pre-quantized checkpoint.")
    N, K = cb.shape
    layer = bnb.nn.Linear8bitLt(K, N, bias="bias" in tensors, has_fp16_weights=False,
                                threshold=float(qc.get("llm_int8_threshold", 6.0)), device="meta")
    layer.weight = bnb.nn.Int8Params(cb, requires_grad=False, has_fp16_weights=False)
    layer.weight.SCB = scb
    if "bias" in tensors:
        layer.bias = nn.Parameter(tensors["bias"], requires_grad=False)
    return layer.eval()


def layer_tensors(layer: nn.Module, qc_out: dict) -> dict:
    """One layer's tensors as an LLM.int8 checkpoint stores them (what int8_checkpoint writes)."""
    out = {"weight": _cb(layer), "SCB": _scb(layer), "weight_format": torch.tensor(0, dtype=torch.uint8)}
    return {**out, "bias": layer.bias.data} if layer.bias is not None else out


def true_zeros_of(tensors: dict, qc: dict) -> torch.Tensor:
    """Zero points [1, N]: all 128 (LLM.int8 is symmetric)."""
    return torch.full((1, tensors["SCB"].shape[0]), ZERO, dtype=torch.uint8)


def checkpoint_config(qc: dict, fits: bool, still_sym: bool) -> tuple[dict, dict, dict]:
    """(quantization_config, extra files, facts): the base's own config (a merge cannot move its zero points)."""
    return qc, {}, {"format": "bitsandbytes LLM.int8", "fast_path_note": None}


def kernels(qc: dict) -> list[tuple[str, str, bool]]:
    return [("bitsandbytes Linear8bitLt (transformers)", "cpu, cuda, xpu", True)]


def load_config(qc: dict):
    return None  # transformers' own bitsandbytes loading


def describe(qc: dict) -> list[tuple[str, object]]:
    return [("kind", "bitsandbytes LLM.int8 checkpoint"), ("bits", 8), ("outlier threshold", qc.get("llm_int8_threshold")),
            ("skipped modules", qc.get("llm_int8_skip_modules"))]


class Int8Format(Streams, Format):
    name, quant_method = NAME, "bitsandbytes"
    requires = (("bitsandbytes", "bitsandbytes"),)
    layer_tensor_names = LAYER_TENSORS
    is_layer, dispatch = staticmethod(is_int8_layer), staticmethod(dispatch_int8)
    prepare_model = staticmethod(prepare_int8_model)
    model_is = staticmethod(model_is_int8)
    checkpoint = staticmethod(int8_checkpoint)
    load_config, kernels, describe = staticmethod(load_config), staticmethod(kernels), staticmethod(describe)
    matches = staticmethod(config_is_int8)  # "bitsandbytes" holds 4-bit models too: only load_in_8bit is ours
    layer_from_tensors, layer_tensors = staticmethod(layer_from_tensors), staticmethod(layer_tensors)
    true_zeros_of, checkpoint_config = staticmethod(true_zeros_of), staticmethod(checkpoint_config)


FORMAT = Int8Format()
