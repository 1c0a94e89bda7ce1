"""AWQ (the GEMM layout) as gptqmodel holds it, in this order: codec, layout check, reading (dispatch), writing (new
layers and checkpoints), kernels.

Buffers of an AWQ GEMM layer: `qweight` int32 [K, N*b/32] (codes packed along the output dimension),
`qzeros` int32 [G, N*b/32] (raw zero points, packed the same way), `scales` fp16 [G, N], optional
`bias`; groups are contiguous runs of input rows (no act-order, no g_idx). 4-bit words interleave
their eight columns: nibble i of word j holds column 8j + AWQ_ORDER[i]. Other widths are a plain
little-endian bit stream along the row (formats/packing.py's convention, along dim 1).

transformers loads AWQ checkpoints through gptqmodel (>= 5). Its kernels:

- `AwqTorchLinear` ("torch_awq") keeps the layout, trains and runs on every device and every width:
  the kernel adapted layers run on. It computes in the activations' dtype when that is fp16 or bf16
  and in fp16 otherwise (casting the output back), and first converts its scales and bias to that
  dtype, in place: `AWQWeights.kernel_input` / `kernel_output` mirror exactly that, so an adapter
  computes what the merged layer will.
- `TorchAtenAwqLinear` / `TorchFusedAwqLinear` / `TorchCpuAvx512AwqLinear` (the CPU defaults, 4-bit)
  keep the layout until their first inference call, then repack privately: while untouched,
  `prepare_awq_model` moves them to AwqTorchLinear, losslessly (the buffers are shared).
- Marlin, Machete, ExLlama, GEMV, ... repack at load (or use another layout): refused with the way
  to load the model instead.
"""

from __future__ import annotations

import json
import logging
from typing import Optional

import torch
from torch import nn

from .base import (BuildsLayers, Format, PackedBufferWeights, QuantState, Streams, checked_layers, gptqmodel_kernels,
                   group_layout, layers_of, stamp_quantizer, swap_layers)
from .base import model_quantization_config as quantization_config
from . import serving
from .packing import SUPPORTED_BITS, pack_codes, unpack_codes

logger = logging.getLogger(__name__)

NAME = "awq"
RELOAD_HINT = (
    "Load the model with gptqmodel's layout-keeping AWQ kernel, e.g. AutoModelForCausalLM.from_pretrained(path, "
    "quantization_config=AwqConfig(bits={bits}, backend='torch_awq')) (peft_lota.load_model does this), and call "
    "get_peft_model (or merge) before running inference with it."
)
# Kernels that keep the GEMM layout in qweight/qzeros/scales (the CPU ones until their first inference call).
LAYOUT_KEEPING_KERNELS = ("AwqTorchLinear", "TorchAtenAwqLinear", "TorchFusedAwqLinear", "TorchCpuAvx512AwqLinear")
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # 4-bit: the column of nibble i within each run of eight
AWQ_UNORDER = tuple(AWQ_ORDER.index(c) for c in range(8))  # the nibble that holds column c
KERNEL_DTYPES = (torch.float16, torch.bfloat16)
_WARNED: set = set()  # (scales dtype, activation dtype) pairs already warned about, once per process


# ---- codec ---------------------------------------------------------------------------------------------

_ROW_BLOCK_ELEMENTS = 1 << 20  # int32 words per block in pack_columns (4 MiB)


def _slots(bits: int) -> list[int]:
    """The column (within a word's run) that holds field i of each word."""
    return list(AWQ_ORDER) if bits == 4 else list(range(32 // bits))


def unpack_columns(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """AWQ-packed int32 [R, N*b/32] -> codes uint8 [R, N] in column order.

    2/4/8 bits: each field is shifted straight into its column (a strided write of the low byte), so the
    interleave costs nothing extra; 3 bits (codes spill across words) take packing.py's stream decoder.
    """
    if bits == 3:
        return unpack_codes(packed, bits, dim=1)
    rows, words = packed.shape
    per_word = 32 // bits
    codes = torch.empty(rows, words, per_word, dtype=torch.uint8, device=packed.device)
    src = packed.to(torch.int32)
    for i, col in enumerate(_slots(bits)):
        torch.bitwise_right_shift(src, i * bits, out=codes[:, :, col])  # int32 result, low byte stored
    codes = codes.view(rows, words * per_word)
    if bits < 8:
        codes.bitwise_and_((1 << bits) - 1)
    return codes


def pack_columns(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """codes [R, N] in column order -> AWQ-packed int32 [R, N*b/32] (inverse of unpack_columns)."""
    if codes.numel():
        lo, hi = torch.aminmax(codes)
        if int(lo) < 0 or int(hi) > (1 << bits) - 1:
            raise ValueError(f"codes must lie in [0, {(1 << bits) - 1}] to be packed in {bits} bits.")
    if bits == 3:
        return pack_codes(codes, bits, dim=1)
    rows, n = codes.shape
    per_word = 32 // bits
    if n % per_word:
        raise ValueError(f"{n} columns of {bits}-bit codes do not fill whole int32 words.")
    grouped = codes.reshape(rows, n // per_word, per_word)
    out = torch.empty(rows, n // per_word, dtype=torch.int32, device=codes.device)
    slots = _slots(bits)
    step = max(1, _ROW_BLOCK_ELEMENTS // max(1, n // per_word))
    tmp = torch.empty(min(step, rows), n // per_word, dtype=torch.int32, device=codes.device)
    for r0 in range(0, rows, step):  # Horner's scheme from the last field down, one block of rows at a time
        block, words, t = grouped[r0:r0 + step], out[r0:r0 + step], tmp[: min(step, rows - r0)]
        words.copy_(block[:, :, slots[-1]])
        for i in range(per_word - 2, -1, -1):
            words.bitwise_left_shift_(bits).bitwise_or_(t.copy_(block[:, :, slots[i]]))
    return out


def kernel_dtype(x_dtype: torch.dtype) -> torch.dtype:
    """The dtype AwqTorchLinear computes in for activations of `x_dtype`."""
    return x_dtype if x_dtype in KERNEL_DTYPES else torch.float16


# ---- which layers, in which layout ---------------------------------------------------------------------

def _classes():
    from gptqmodel.nn_modules.qlinear import AWQuantLinear
    from gptqmodel.nn_modules.qlinear.torch_awq import AwqTorchLinear

    return AWQuantLinear, AwqTorchLinear


def is_awq_layer(module: nn.Module) -> bool:
    try:
        AWQuantLinear, _ = _classes()
    except ImportError:  # gptqmodel not installed (or too old to load AWQ): no AWQ layers can exist
        return False
    return isinstance(module, AWQuantLinear) and hasattr(module, "qweight")


def awq_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return layers_of(model, is_awq_layer)


def layout_problem(name: str, module: nn.Module) -> Optional[str]:
    """Why this AWQ layer's buffers are not in the GEMM layout we read and write, or None if they are."""
    cls = type(module).__name__
    bits = getattr(module, "bits", None)
    if bits not in SUPPORTED_BITS:
        return f"layer {name} ({cls}) holds {bits}-bit codes; peft_lota supports {SUPPORTED_BITS}-bit AWQ."
    if getattr(module, "_cpu_transformed", False) or str(getattr(module, "linear_mode", None)).lower().endswith(
            "inference"):
        return (f"layer {name} ({cls}) has already repacked its weights into a private layout for fast CPU "
                "inference (it does so on its first call under torch.inference_mode / no_grad).")
    if cls not in LAYOUT_KEEPING_KERNELS:
        return f"layer {name} uses the {cls} kernel, which does not hold AWQ's GEMM layout."
    if getattr(module, "pack_dtype", torch.int32) != torch.int32:
        return f"layer {name} ({cls}) packs its codes in {module.pack_dtype}, not int32."
    K, N = module.in_features, module.out_features
    if (N * bits) % 32:
        return f"layer {name} ({cls}): {N} output columns of {bits}-bit codes do not fill whole int32 words."
    gs = K if module.group_size in (-1, 0) else module.group_size
    if K % gs:
        return f"layer {name} ({cls}): {K} input rows are not whole groups of {gs}."
    if (tuple(module.qweight.shape) != (K, N * bits // 32) or tuple(module.qzeros.shape) != (K // gs, N * bits // 32)
            or tuple(module.scales.shape) != (K // gs, N)):
        return f"layer {name} ({cls}) has buffers of non-standard shapes."
    return None


def model_is_awq(model: nn.Module) -> bool:
    qc = quantization_config(model)
    return qc is not None and qc.get("quant_method") == "awq"


def grid_problem(in_features: int, out_features: int, bits: int, group_size: int, sym: bool,
                 act_order: bool = False) -> Optional[str]:
    """Why a new AWQ GEMM layer [in_features, out_features] with this grid cannot be stored, or None."""
    gs = in_features if group_size in (-1, 0) else group_size
    if act_order:
        return "AWQ's groups are contiguous runs of input rows: act-order (a permuted g_idx) cannot be stored."
    if bits not in SUPPORTED_BITS:
        return f"AWQ layers here hold {SUPPORTED_BITS}-bit codes, not {bits}."
    if (out_features * bits) % 32:
        return f"AWQ packs codes along the output, and {out_features} columns of {bits} bits do not fill int32 words."
    if in_features % gs:
        return f"AWQ groups are whole runs of input rows, and in_features={in_features} is not a multiple of {gs}."
    return None


# ---- reading: getting layers into a trainable, readable layout -------------------------------------------

def _to_torch_awq(module: nn.Module) -> nn.Module:
    """An AwqTorchLinear holding exactly the same buffers (shared, not copied)."""
    _, AwqTorchLinear = _classes()
    new = AwqTorchLinear(bits=module.bits, group_size=module.group_size, sym=module.sym, desc_act=False,
                         in_features=module.in_features, out_features=module.out_features,
                         bias=module.bias is not None, pack_dtype=module.pack_dtype, register_buffers=True)
    for name in ("qweight", "qzeros", "scales", "bias"):
        src = getattr(module, name)
        if src is not None:
            setattr(new, name, src)
    new.train(module.training)
    new.post_init()
    return new


def prepare_awq_model(model: nn.Module) -> int:
    """Move every AWQ layer of `model` to AwqTorchLinear (layout-keeping, trainable). Returns how many moved."""
    layers = awq_layers(model)
    if not layers:
        return 0
    _, AwqTorchLinear = _classes()
    moved = sum(type(m) is not AwqTorchLinear for _, m in layers)
    hint = RELOAD_HINT.format(bits=(quantization_config(model) or {}).get("bits", "<bits>"))
    swap_layers(model, layers, layout_problem, AwqTorchLinear, _to_torch_awq, "AWQ", hint)
    if moved:
        logger.info("peft_lota: moved %d AWQ layers to the trainable, layout-keeping AwqTorchLinear kernel.", moved)
    return moved


class AWQWeights(PackedBufferWeights):
    """Codes, zeros and scales of a gptqmodel AWQ GEMM layer (AwqTorchLinear, after prepare_awq_model): raw zero
    points, any value in [0, maxq]."""

    format_name = NAME

    def __init__(self, layer: nn.Module):
        super().__init__(layer)
        gs = layer.group_size
        self.group_size = self.in_features if gs in (-1, 0) else gs

    def pack_codes(self, codes: torch.Tensor) -> torch.Tensor:
        return pack_columns(codes, self.bits)

    def pack_zeros(self, zeros: torch.Tensor) -> torch.Tensor:
        return pack_columns(zeros.to(torch.int32), self.bits)

    def read(self) -> QuantState:
        base, bits = self.layer, self.layer.bits
        qweight = base.qweight.detach()  # this storage, even if a merge swaps in another

        def codes_rows(k0: int, k1: int) -> torch.Tensor:  # rows are packed independently: any k0, k1
            return unpack_columns(qweight[k0:k1], bits)

        zeros, g_idx, layout = self._decoded_metadata()
        return QuantState(None, zeros, base.scales, g_idx, self.maxq, base.bias, codes_rows=codes_rows,
                          in_features=self.in_features, row_align=1, layout=layout)

    def _decoded_metadata(self):
        """Zero points, g_idx and its layout, decoded once and reused while qzeros is the same tensor, unchanged."""
        qzeros = self.layer.qzeros
        cached = self.__dict__.get("_metadata")
        if cached is None or cached[0][0].data_ptr() != qzeros.data_ptr() or cached[0][1] != qzeros._version:
            zeros = unpack_columns(qzeros, self.bits)
            g_idx = torch.arange(self.in_features, device=qzeros.device) // self.group_size
            layout = group_layout(g_idx, zeros.shape[0])
            cached = self.__dict__["_metadata"] = ((qzeros.detach(), qzeros._version), zeros, g_idx, layout)
        return cached[1:]

    def grid_settings(self) -> dict:
        # the layer's `sym` comes from transformers' AwqConfig, whose default says True even for asymmetric models
        zeros = self._decoded_metadata()[0]
        sym = bool((zeros == 1 << (self.bits - 1)).all())
        return {"bits": self.bits, "group_size": self.layer.group_size, "sym": sym}

    def kernel_input(self, x: torch.Tensor) -> torch.Tensor:
        """x as AwqTorchLinear computes with it, after the same in-place conversion of its scales and bias."""
        dtype = kernel_dtype(x.dtype)
        base = self.layer
        for name in ("scales", "bias"):
            t = getattr(base, name)
            if t is not None and t.dtype != dtype:
                if name == "scales" and (t.dtype, dtype) not in _WARNED:
                    _WARNED.add((t.dtype, dtype))
                    logger.warning("peft_lota: %s-activations make gptqmodel's AWQ kernel round this model's %s "
                                   "scales to %s (it would for the stock model too), and the merged checkpoint stores "
                                   "them so. Load the model in float16 to keep the checkpoint's scales.",
                                   x.dtype, t.dtype, dtype)
                setattr(base, name, t.to(dtype))
        return x.to(dtype)

    def kernel_output(self, out: torch.Tensor, bias: Optional[torch.Tensor], input_dtype: torch.dtype) -> torch.Tensor:
        if bias is not None:
            out = out + bias  # the kernel's op: type promotion, not a cast of the bias
        return out.to(input_dtype)


def dispatch_awq(module: nn.Module, name: str = "") -> Optional[AWQWeights]:
    """The AWQWeights of a gptqmodel AWQ layer, or None if `module` is not one."""
    if not is_awq_layer(module):
        return None
    problem = layout_problem(name or type(module).__name__, module)
    if problem:
        raise ValueError(problem + " " + RELOAD_HINT.format(bits=module.bits))
    return AWQWeights(module)


# ---- writing: new layers (from a full-precision model), and a standard checkpoint of a whole model -----------

def build_layer(codes: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor, bias,
                bits: int, group_size: int, sym: bool) -> nn.Module:
    """An AwqTorchLinear holding these codes [K, N], raw zeros [G, N], scales [G, N] (stored dtype) and bias; `g_idx`
    must be the contiguous k // group_size (AWQ has no act-order)."""
    _, AwqTorchLinear = _classes()
    K, N = codes.shape
    gs = K if group_size in (-1, 0) else group_size
    if not torch.equal(g_idx.long().cpu(), torch.arange(K) // gs):
        raise ValueError("AWQ layers have contiguous groups of input rows: this grid's g_idx (act-order) cannot be "
                         "stored in AWQ.")
    layer = AwqTorchLinear(bits=bits, group_size=group_size, sym=sym, desc_act=False, in_features=K, out_features=N,
                           bias=bias is not None, pack_dtype=torch.int32, register_buffers=True)
    layer.qweight = pack_columns(codes, bits).to(codes.device)
    layer.qzeros = pack_columns(zeros.to(torch.int32), bits).to(codes.device)
    layer.scales = scales.detach().clone().contiguous()
    if bias is not None:
        layer.bias = bias.detach().clone().to(scales.dtype)
    layer.post_init()
    layer.eval()
    return layer


def new_config(bits: int, group_size: int, sym: bool) -> dict:
    """The `config.quantization_config` of an AWQ GEMM model made by peft_lota."""
    from transformers import AwqConfig

    qc = AwqConfig(bits=bits, group_size=group_size, zero_point=not sym, version="gemm").to_dict()
    qc.update(quant_method="awq", format="gemm", version="gemm", zero_point=not sym, sym=sym, meta={})
    qc.pop("checkpoint_format", None)
    return stamp_quantizer(qc)


def awq_checkpoint(model: nn.Module) -> tuple[dict, dict, dict, dict]:
    """(state_dict, quantization_config, extra files, facts) of a standard AWQ GEMM checkpoint of `model`.

    Every tensor is written as it is in memory (AWQ stores raw zero points: nothing to convert).
    `zero_point`: false (symmetric, every zero point 2**(bits-1)) stays false unless a merge moved a zero point.
    """
    qc = quantization_config(model)
    if qc is None or qc.get("quant_method") != "awq":
        raise ValueError("An AWQ checkpoint needs a transformers model with an AWQ quantization_config "
                         "(quant_method 'awq').")
    bits = int(qc["bits"])
    layers = awq_layers(model)
    checked_layers(model, layers, layout_problem, bits, "AWQ", RELOAD_HINT.format(bits=bits))
    fmt = str(qc.get("format") or qc.get("version") or "gemm").lower()
    if fmt != "gemm":
        raise ValueError(f"This model's AWQ config says format {fmt!r}; peft_lota writes the GEMM layout only.")

    still_sym = all(bool((unpack_columns(m.qzeros, bits) == 1 << (bits - 1)).all()) for _, m in layers)
    qc, extra, facts = checkpoint_config(qc, True, still_sym)
    return model.state_dict(), qc, extra, facts


def checkpoint_config(qc: dict, fits: bool, still_sym: bool) -> tuple[dict, dict, dict]:
    """(quantization_config, extra files, facts) of a checkpoint written from a model loaded with `qc` whose zero points
    are all still centred (still_sym); AWQ stores any zero point (`fits` is for the formats' common signature)."""
    bits = int(qc["bits"])
    was_sym = not bool(qc.get("zero_point", True))  # `sym` in transformers' AwqConfig is GPTQConfig's default
    sym = was_sym and still_sym
    if was_sym and not sym:
        logger.warning("peft_lota: zero points of a symmetric AWQ checkpoint have moved; it is written with "
                       "zero_point=true (asymmetric).")
    qc.update(format="gemm", version="gemm", zero_point=not sym, sym=sym, backend="auto")
    meta = stamp_quantizer(qc)["meta"]
    qc.pop("checkpoint_format", None)  # transformers' AwqConfig.to_dict drops it too
    extra = {"quantize_config.json": json.dumps(
        {"bits": bits, "group_size": qc["group_size"], "desc_act": False, "lm_head": False, "method": "awq",
         "quant_method": "awq", "format": "gemm", "checkpoint_format": "gemm", "pack_dtype": "int32",
         "meta": meta, "zero_point": not sym, "version": "gemm"}, indent=2) + "\n"}
    serving = [name for name, _, ok in kernels(qc) if ok]
    loaders = ("Needs `gptqmodel` installed (transformers loads AWQ through it). Kernels that can serve it: "
               + (", ".join(serving) or "none known") + ".")
    facts = {"format": "AWQ", "bits": bits, "group_size": qc["group_size"], "desc_act": False, "sym": sym,
             "checkpoint_format": "gemm", "loaders": loaders, "kernels": serving, "fast_path_note": fast_path_note(qc)}
    return qc, extra, facts


# ---- streaming: one layer from a checkpoint's tensors, and back ------------------------------------------

LAYER_TENSORS = ("qweight", "qzeros", "scales", "bias")


def layer_from_tensors(tensors: dict, qc: dict) -> nn.Module:
    """An AwqTorchLinear holding one layer's checkpoint tensors ({"qweight": ..., "qzeros": ..., ...})."""
    _, AwqTorchLinear = _classes()
    bits = int(qc["bits"])
    qweight = tensors["qweight"]
    K, N = qweight.shape[0], qweight.shape[1] * 32 // bits
    layer = AwqTorchLinear(bits=bits, group_size=int(qc["group_size"]), sym=not qc.get("zero_point", True),
                           desc_act=False, in_features=K, out_features=N, bias="bias" in tensors,
                           pack_dtype=torch.int32, register_buffers=True)
    for name in LAYER_TENSORS:
        if name in tensors:
            setattr(layer, name, tensors[name])
    layer.post_init()
    return layer


def layer_tensors(layer: nn.Module, qc_out: dict) -> dict:
    """One layer's tensors as an AWQ checkpoint stores them (as they are in memory)."""
    return {name: getattr(layer, name) for name in LAYER_TENSORS if getattr(layer, name, None) is not None}


def true_zeros_of(tensors: dict, qc: dict) -> torch.Tensor:
    """Zero points [G, N] (uint8) from a layer's stored tensors."""
    return unpack_columns(tensors["qzeros"], int(qc["bits"]))


GPTQMODEL_MODULES = ("marlin_awq", "gemm_awq", "torch_fused_awq", "torch_aten_kernel_awq", "torch_awq")
GPTQMODEL_KERNELS = ("AwqMarlinLinear", "AwqGEMMLinear", "TorchFusedAwqLinear", "TorchAtenAwqLinear", "AwqTorchLinear")


def serving_grid(qc: dict) -> serving.Grid:
    return serving.Grid(int(qc["bits"]), int(qc["group_size"]), qc.get("zero_point", True) is False, False)


def kernels(qc: dict) -> list[tuple[str, str, bool]]:
    """(kernel, devices, can serve) for an AWQ quantization config, from the installed kernels' own declarations
    (gptqmodel) and the GPU servers' rules (serving.py)."""
    def supports(cls) -> bool:
        return (qc["bits"] in getattr(cls, "SUPPORTS_BITS", [qc["bits"]])
                and qc["group_size"] in getattr(cls, "SUPPORTS_GROUP_SIZE", [qc["group_size"]]))

    return gptqmodel_kernels(GPTQMODEL_MODULES, GPTQMODEL_KERNELS, supports) + serving.rows("awq", serving_grid(qc))


def fast_path_note(qc: dict) -> Optional[str]:
    """Which GPU server refuses this checkpoint, why, and the conversion it serves; or None."""
    return serving.note("awq", serving_grid(qc))


def load_config(qc: dict):
    """AwqConfig that loads a checkpoint with AwqTorchLinear ("torch_awq"); the rest comes from its config.json."""
    from transformers import AwqConfig

    return AwqConfig(bits=qc["bits"], backend="torch_awq")


def describe(qc: dict) -> list[tuple[str, object]]:
    fmt = str(qc.get("format") or qc.get("version") or "gemm").lower()
    return [("kind", "AWQ checkpoint"), ("format", fmt + ("" if fmt == "gemm" else " (peft_lota reads GEMM only)")),
            ("bits", qc["bits"]), ("group size", qc["group_size"]), ("symmetric", not qc.get("zero_point", True))]


class AwqFormat(BuildsLayers, Streams, Format):
    name, quant_method = NAME, "awq"
    requires = (("gptqmodel", "awq"),)
    layer_tensor_names, zero_point_tensors = LAYER_TENSORS, ("qzeros",)
    is_layer, dispatch = staticmethod(is_awq_layer), staticmethod(dispatch_awq)
    prepare_model = staticmethod(prepare_awq_model)
    model_is = staticmethod(model_is_awq)
    checkpoint = staticmethod(awq_checkpoint)
    load_config, kernels, describe = staticmethod(load_config), staticmethod(kernels), staticmethod(describe)
    fast_path_note = staticmethod(fast_path_note)
    grid_problem = staticmethod(grid_problem)
    build_layer = staticmethod(build_layer)
    new_config = staticmethod(new_config)
    layer_from_tensors, layer_tensors = staticmethod(layer_from_tensors), staticmethod(layer_tensors)
    true_zeros_of, checkpoint_config = staticmethod(true_zeros_of), staticmethod(checkpoint_config)


FORMAT = AwqFormat()
