"""GPTQ as gptqmodel holds it, in this order: codec, layout check, reading (dispatch), writing (new layers and
checkpoints), kernels.

Buffers of a GPTQ layer: `qweight` int32 [K*b/32, N] (codes packed along the input
dimension), `qzeros` int32 [G, N*b/32] (zero points packed along the output dimension), `scales`
fp16 [G, N], `g_idx` int32 [K], optional `bias`. On disk the classic format ("gptq", v1) stores
z - 1; "gptq_v2" stores the true z, which is what gptqmodel keeps in memory after converting.

gptqmodel's kernels differ in what they do with that layout:

- `TorchLinear` ("gptq_torch") keeps it, trains, and runs on every device: the kernel adapted
  layers run on.
- `TorchAtenLinear` / `TorchCpuAvx512Linear` / `TorchFusedLinear` (the default CPU kernels) and
  `TritonV2Linear` keep it until their first inference call, after which the CPU ones repack into a
  private layout (and the AVX512 one refuses `train()`): while still untouched, `prepare_gptq_model`
  moves them to `TorchLinear`, losslessly.
- Marlin, Machete, ExLlama, BitBLAS, ... repack at load: their codes cannot be read; the error says
  how to load the model instead.
"""

from __future__ import annotations

import logging
from typing import Optional

import torch
from torch import nn

from .base import (BuildsLayers, Format, PackedBufferWeights, QuantState, Streams, checked_layers, clear_kernel_caches,
                   gptqmodel_kernels, group_layout, layers_of, stamp_quantizer, swap_layers)
from .base import model_quantization_config as quantization_config
from . import serving
from .packing import SUPPORTED_BITS, pack_codes, unpack_codes, word_rows

logger = logging.getLogger(__name__)

NAME = "gptq"
RELOAD_HINT = (
    "Load the model with a layout-keeping kernel, e.g. AutoModelForCausalLM.from_pretrained(path, "
    "quantization_config=GPTQConfig(bits={bits}, backend='gptq_torch')), and call get_peft_model (or merge) "
    "before running inference with it."
)
# Kernels that hold qweight/qzeros/scales/g_idx in the standard layout (the CPU ones until their first
# inference call). Matched by exact class: a subclass may repack.
LAYOUT_KEEPING_KERNELS = ("TorchLinear", "TritonV2Linear", "TorchAtenLinear", "TorchCpuAvx512Linear",
                          "TorchFusedLinear")


# ---- codec: GPTQ's tensors as pure functions ------------------------------------------------------------

def unpack_qweight(qweight: torch.Tensor, bits: int) -> torch.Tensor:
    """`qweight` int32 [K*b/32, N] -> codes uint8 [K, N]."""
    return unpack_codes(qweight, bits, dim=0)


def pack_qweight(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """codes [K, N] -> `qweight` int32 [K*b/32, N]."""
    return pack_codes(codes, bits, dim=0)


def unpack_qzeros(qzeros: torch.Tensor, bits: int) -> torch.Tensor:
    """`qzeros` int32 [groups, N*b/32] -> stored zero points uint8 [groups, N] (no +1 applied)."""
    return unpack_codes(qzeros, bits, dim=1)


def pack_qzeros(zeros: torch.Tensor, bits: int) -> torch.Tensor:
    """stored zero points [groups, N] -> `qzeros` int32 [groups, N*b/32]."""
    return pack_codes(zeros, bits, dim=1)


def zeros_v2_to_v1(qzeros: torch.Tensor, bits: int) -> torch.Tensor:
    """Packed true zero points (v2, "gptq_v2") -> packed classic zero points (v1, "gptq": z - 1).

    A v1 checkpoint cannot hold a true zero point of 0 (it would need -1); refuse rather than
    write a checkpoint that loads wrong.
    """
    z = unpack_qzeros(qzeros, bits).to(torch.int16)
    if z.numel() and int(z.min()) < 1:
        raise ValueError(
            "this layer has a zero point of 0, which the classic GPTQ format ('gptq', v1) cannot store; "
            "save it in 'gptq_v2' format instead."
        )
    return pack_qzeros(z - 1, bits)


def zeros_v1_to_v2(qzeros: torch.Tensor, bits: int) -> torch.Tensor:
    """Packed classic zero points (v1: z - 1) -> packed true zero points (v2)."""
    z = unpack_qzeros(qzeros, bits).to(torch.int16) + 1
    if z.numel() and int(z.max()) > (1 << bits) - 1:
        raise ValueError(
            f"a stored v1 zero point of {(1 << bits) - 1} means a true zero point of {1 << bits}, "
            f"which does not fit in {bits} bits of the 'gptq_v2' format."
        )
    return pack_qzeros(z, bits)


# ---- which layers, in which layout ---------------------------------------------------------------------

def _qlinear_classes():
    from gptqmodel.nn_modules.qlinear import GPTQQuantLinear
    from gptqmodel.nn_modules.qlinear.torch import TorchLinear

    return GPTQQuantLinear, TorchLinear


def is_gptq_layer(module: nn.Module) -> bool:
    try:
        GPTQQuantLinear, _ = _qlinear_classes()
    except ImportError:  # gptqmodel not installed: no GPTQ layers can exist
        return False
    return isinstance(module, GPTQQuantLinear) and hasattr(module, "qweight")


def gptq_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return layers_of(model, is_gptq_layer)


def layout_problem(name: str, module: nn.Module) -> Optional[str]:
    """Why this GPTQ layer's buffers are not in the standard layout, or None if they are.

    The one check every reader and writer of GPTQ buffers uses (adapters, merges, export).
    """
    cls = type(module).__name__
    bits = getattr(module, "bits", None)
    if getattr(module, "planar", False) or bits not in SUPPORTED_BITS:
        return (f"layer {name} ({cls}) holds {bits}-bit codes in gptqmodel's planar layout; peft_lota supports "
                f"{SUPPORTED_BITS} bits in the standard GPTQ layout.")
    if getattr(module, "_cpu_transformed", False) or getattr(module, "linear_mode", None) == "inference":
        return (f"layer {name} ({cls}) has already repacked its weights into a private layout for fast CPU "
                "inference (it does so on its first call under torch.inference_mode / no_grad).")
    if cls not in LAYOUT_KEEPING_KERNELS:
        return f"layer {name} uses the {cls} kernel, which repacks GPTQ weights into its own layout at load."
    if getattr(module, "pack_dtype", torch.int32) != torch.int32:
        return f"layer {name} ({cls}) packs its codes in {module.pack_dtype}, not int32."
    K, N = module.in_features, module.out_features
    if (tuple(module.qweight.shape) != (K * bits // 32, N) or module.qzeros.shape[0] != module.scales.shape[0]
            or tuple(module.g_idx.shape) != (K,)):
        return f"layer {name} ({cls}) has buffers of non-standard shapes."
    return None


def model_is_gptq(model: nn.Module) -> bool:
    qc = quantization_config(model)
    return qc is not None and qc.get("quant_method") == "gptq"


def checkpoint_format(model: nn.Module) -> str:
    """"gptq" (v1, zeros stored as z - 1) or "gptq_v2" (true zeros), as the model was loaded."""
    qc = quantization_config(model) or {}
    return (qc.get("checkpoint_format") or qc.get("format") or "gptq").lower()


def grid_problem(in_features: int, out_features: int, bits: int, group_size: int, sym: bool,
                 act_order: bool = False) -> Optional[str]:
    """Why a new GPTQ layer [in_features, out_features] with this grid cannot be stored, or None."""
    if bits not in SUPPORTED_BITS:
        return f"GPTQ layers here hold {SUPPORTED_BITS}-bit codes, not {bits}."
    if in_features % word_rows(bits):
        return (f"GPTQ packs {bits}-bit codes along the input in runs of {word_rows(bits)} rows, and in_features="
                f"{in_features} is not a multiple of it.")
    return None


# ---- reading: getting layers into a trainable, readable layout -------------------------------------------

def _to_torch_linear(module: nn.Module) -> nn.Module:
    """A TorchLinear holding exactly the same codes, zeros (as v2), scales, g_idx and bias."""
    _, TorchLinear = _qlinear_classes()
    new = TorchLinear(
        bits=module.bits, group_size=module.group_size, sym=module.sym, desc_act=module.desc_act,
        in_features=module.in_features, out_features=module.out_features, bias=module.bias is not None,
        pack_dtype=module.pack_dtype, register_buffers=True,
    )
    for name in ("qweight", "qzeros", "scales", "g_idx", "bias"):
        src = getattr(module, name)
        if src is not None:
            setattr(new, name, src)  # buffers are shared, not copied: no extra memory
    new.qzero_format(format=module.qzero_format())  # normalised to v2 right after by prepare_gptq_model
    new.train(module.training)
    new.post_init()
    return new


def _normalise_zero_format(module: nn.Module, zeros_may_be_v1: bool) -> None:
    """Hold true (v2) zero points in memory, and say so in the layer's format flag.

    gptqmodel's flag is only reliable when it says 2 (set when gptqmodel converts): a layer loaded
    from a v2 checkpoint keeps the constructor's default 1. So zeros are v1 in memory exactly when
    the flag says 1 and the checkpoint is v1 (loaded by a kernel that does not require v2). Such
    zeros were made from v2 by a packed-word subtraction (borrows cross fields), so gptqmodel's own
    packed-word addition is the exact inverse. We also drop the v1/v2 clones that some kernels swap
    into `qzeros.data` on train()/eval(): they would silently undo a merged zero point.
    """
    for attr in ("qzeros_data_v1", "qzeros_data_v2"):
        if hasattr(module, attr):
            delattr(module, attr)
    if module.qzero_format() == 1 and zeros_may_be_v1:
        from gptqmodel.utils.model import convert_gptq_v1_to_v2_format_module

        convert_gptq_v1_to_v2_format_module(module, bits=module.bits, pack_dtype=module.pack_dtype)
    module.qzero_format(format=2)
    clear_kernel_caches(module)


def prepare_gptq_model(model: nn.Module) -> int:
    """Move every GPTQ layer of `model` to TorchLinear with v2 zeros in memory. Returns how many moved.

    All GPTQ layers, not only the targeted ones: Trainer calls model.train() every step, and a
    kernel that refuses train() anywhere in the model would crash it.
    """
    layers = gptq_layers(model)
    if not layers:  # (nothing to move; and without gptqmodel installed there can be no GPTQ layer)
        return 0
    _, TorchLinear = _qlinear_classes()
    zeros_may_be_v1 = checkpoint_format(model) == "gptq"
    moved = sum(type(m) is not TorchLinear for _, m in layers)
    hint = RELOAD_HINT.format(bits=(quantization_config(model) or {}).get("bits", "<bits>"))
    for module in swap_layers(model, layers, layout_problem, TorchLinear, _to_torch_linear, "GPTQ", hint):
        _normalise_zero_format(module, zeros_may_be_v1)
    if moved:
        logger.info("peft_lota: moved %d GPTQ layers to the trainable, layout-keeping TorchLinear kernel.", moved)
    return moved


class GPTQWeights(PackedBufferWeights):
    """Codes, zeros and scales of a gptqmodel GPTQ layer in the standard layout (after prepare_gptq_model); zero
    points are true (v2) zeros in memory (prepare_gptq_model made sure)."""

    format_name = NAME

    def zero_range(self) -> tuple[int, int]:
        # The classic format stores z - 1 (so z >= 1), and gptqmodel's v1 -> v2 load is a packed-word add that
        # carries into the neighbouring field for a stored maxq (so z <= maxq): [1, maxq] loads everywhere.
        return 1, self.maxq

    def pack_codes(self, codes: torch.Tensor) -> torch.Tensor:
        return pack_qweight(codes, self.bits)

    def pack_zeros(self, zeros: torch.Tensor) -> torch.Tensor:
        return pack_qzeros(zeros, self.bits)

    def read(self) -> QuantState:
        base = self.layer
        bits, qweight = base.bits, base.qweight.detach()  # this storage, even if a merge swaps in another

        def codes_rows(k0: int, k1: int) -> torch.Tensor:  # rows k0..k1-1: whole words (row_align)
            return unpack_qweight(qweight[k0 * bits // 32: k1 * bits // 32], bits)

        zeros, g_idx, layout = self._decoded_metadata()
        return QuantState(None, zeros, base.scales, g_idx, self.maxq, base.bias, codes_rows=codes_rows,
                          in_features=self.in_features, row_align=word_rows(bits), layout=layout,
                          zero_range=self.zero_range())

    def _decoded_metadata(self):
        """Zero points, g_idx and its group layout, decoded once and reused while qzeros and g_idx are unchanged.

        Every forward needs them and training never changes them; a merge swaps a new qzeros in (new
        storage) and in-place writes bump the tensor version, either of which invalidates this cache.
        """
        base = self.layer
        sources = (base.qzeros, base.g_idx, base.scales)
        cached = self.__dict__.get("_metadata")
        # The cache holds aliases of its sources: their storage cannot be freed and reused at the same address.
        if cached is None or any(a.data_ptr() != t.data_ptr() or a.shape != t.shape or v != t._version
                                 for (a, v), t in zip(cached[0], sources)):
            # Zeros are true (v2) zeros in memory: prepare_gptq_model made sure.
            zeros = unpack_qzeros(base.qzeros, base.bits)[:, : self.out_features]
            g_idx = base.g_idx.long()
            key = tuple((t.detach(), t._version) for t in sources)
            layout = group_layout(g_idx, base.scales.shape[0])
            cached = self.__dict__["_metadata"] = (key, zeros, g_idx, layout)
        return cached[1:]


def dispatch_gptq(module: nn.Module, name: str = "") -> Optional[GPTQWeights]:
    """The GPTQWeights of a gptqmodel GPTQ layer, or None if `module` is not one."""
    if not is_gptq_layer(module):
        return None
    problem = layout_problem(name or type(module).__name__, module)
    if problem:
        raise ValueError(problem + " " + RELOAD_HINT.format(bits=module.bits))
    return GPTQWeights(module)


# ---- writing: new layers (from a full-precision model), and a standard checkpoint of a whole model -----------

def build_layer(codes: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor, bias,
                bits: int, group_size: int, sym: bool) -> nn.Module:
    """A TorchLinear holding these codes [K, N], true zeros [G, N], scales [G, N] (stored dtype), g_idx and bias.

    Its forward is the stock kernel's, so it computes exactly the weight `dequantize` describes.
    """
    _, TorchLinear = _qlinear_classes()
    K, N = codes.shape
    layer = TorchLinear(bits=bits, group_size=group_size, sym=sym, desc_act=False, in_features=K, out_features=N,
                        bias=bias is not None, pack_dtype=torch.int32, register_buffers=True)
    layer.qweight = pack_qweight(codes, bits).to(codes.device)
    layer.qzeros = pack_qzeros(zeros.to(torch.int32), bits).to(codes.device)
    layer.scales = scales.detach().clone().contiguous()
    layer.g_idx = g_idx.to(torch.int32).to(codes.device)
    if bias is not None:
        layer.bias = bias.detach().clone().to(scales.dtype)
    layer.qzero_format(format=2)  # true zero points in memory, as prepare_gptq_model leaves every layer
    layer.post_init()
    layer.eval()
    return layer


def new_config(bits: int, group_size: int, sym: bool) -> dict:
    """The `config.quantization_config` of a GPTQ model made by peft_lota (what every GPTQ loader reads)."""
    from transformers import GPTQConfig

    qc = GPTQConfig(bits=bits, group_size=group_size, sym=sym, desc_act=False, checkpoint_format="gptq").to_dict()
    qc.update(quant_method="gptq", format="gptq", checkpoint_format="gptq", dataset=None, tokenizer=None, meta={})
    return stamp_quantizer(qc)


def _true_zeros(layer: nn.Module, loaded_format: str) -> torch.Tensor:
    """Packed true zero points (v2) of a layer, whatever its in-memory format.

    gptqmodel's `qzero_format()` marker is 2 only when it converted v1 -> v2 itself; a layer loaded
    from a "gptq_v2" checkpoint holds true zeros under the default marker 1. So: v2 unless the
    checkpoint was v1 and the layer was never converted.
    """
    if layer.qzero_format() == 2 or loaded_format == "gptq_v2":
        return layer.qzeros.data
    return zeros_v1_to_v2(layer.qzeros.data, layer.bits)


def gptq_checkpoint(model: nn.Module) -> tuple[dict, dict, dict, dict]:
    """(state_dict, quantization_config, extra files, facts) of a standard GPTQ checkpoint of `model`.

    - format: classic v1 ("gptq") when every true zero point z is in [1, maxq], which every stock
      loader reads. z = 0 cannot be stored in v1 (it would be -1), and gptqmodel converts v1 to v2 at
      load with a packed integer add that would carry into the neighbouring zero point for a stored
      maxq, so [1, maxq] is exactly the safe range. Otherwise "gptq_v2" (true z), which only
      gptqmodel-based loaders read; a warning says so.
    - `sym` stays True only if every zero point is still 2**(bits-1): symmetric kernels (Marlin) may
      ignore qzeros.
    - `backend` is "auto": the checkpoint does not pin the kernel the model happened to be trained with.
    - `quantize_config.json` (an extra file) is what GPTQModel's own tools read first.
    Every tensor other than qzeros is written exactly as it is in memory.
    """
    qc = quantization_config(model)
    if qc is None or qc.get("quant_method") != "gptq":
        raise ValueError("A GPTQ checkpoint needs a transformers model with a GPTQ quantization_config "
                         "(quant_method 'gptq').")
    loaded_format = checkpoint_format(model)
    bits = int(qc["bits"])
    layers = gptq_layers(model)
    checked_layers(model, layers, layout_problem, bits, "GPTQ", RELOAD_HINT.format(bits=bits))

    true_zeros = {n: _true_zeros(m, loaded_format) for n, m in layers}
    unpacked = [(unpack_qzeros(true_zeros[n], bits), m.out_features) for n, m in layers]
    fits_v1 = all(int(z.min()) >= 1 for z, _ in unpacked)  # z <= maxq always holds in b bits
    still_sym = all(bool((z[:, :n] == 1 << (bits - 1)).all()) for z, n in unpacked)  # [:, :n]: word padding
    fmt = "gptq" if fits_v1 else "gptq_v2"
    if not fits_v1:
        logger.warning("peft_lota: some zero points are 0, which the classic GPTQ format cannot store; writing a "
                       "'gptq_v2' checkpoint. Only gptqmodel-based loaders (transformers/optimum with gptqmodel, "
                       "GPTQModel) read it; vLLM, TGI, ExLlama and AutoGPTQ do not.")

    state_dict = model.state_dict()
    for name, _ in layers:
        z = true_zeros[name]
        state_dict[f"{name}.qzeros" if name else "qzeros"] = zeros_v2_to_v1(z, bits) if fmt == "gptq" else z
    qc, extra, facts = checkpoint_config(qc, fits_v1, still_sym)
    return state_dict, qc, extra, facts


def checkpoint_config(qc: dict, fits_v1: bool, still_sym: bool) -> tuple[dict, dict, dict]:
    """(quantization_config, extra files, facts) of a checkpoint written from a model loaded with `qc` whose true zero
    points all fit the classic format (fits_v1) and are all still centred (still_sym)."""
    fmt = "gptq" if fits_v1 else "gptq_v2"
    was_sym = bool(qc.get("sym", True))
    qc.update(format=fmt, checkpoint_format=fmt, sym=was_sym and still_sym,
              backend="auto",  # what stock loading picks anyway; never pin a training kernel
              dataset=None, tokenizer=None)  # calibration inputs, not part of a checkpoint
    stamp_quantizer(qc)
    import json

    extra = {"quantize_config.json": json.dumps(_quantize_config_json(qc), indent=2) + "\n"}
    loaders = ("Needs `gptqmodel` (and `optimum`) installed." if fits_v1 else
               "This checkpoint is in the `gptq_v2` format (some zero points are 0, which the classic format cannot "
               "store): it loads with transformers/optimum + gptqmodel and with GPTQModel, not with vLLM, TGI, "
               "ExLlama or AutoGPTQ.")
    note = fast_path_note(qc)
    if was_sym and not qc["sym"]:
        logger.warning("peft_lota: zero points of a symmetric checkpoint have moved, so it is written asymmetric "
                       "(sym=false) and leaves the fast symmetric kernels: %s", note or "")
    serving = [name for name, _, ok in kernels(qc) if ok]
    loaders += " Kernels that can serve it: " + (", ".join(serving) or "none known") + "." + (f" {note}" if note else "")
    facts = {"format": "GPTQ", "bits": qc["bits"], "group_size": qc["group_size"], "desc_act": qc.get("desc_act"),
             "sym": qc["sym"], "checkpoint_format": fmt, "loaders": loaders, "kernels": serving, "fast_path_note": note}
    return qc, extra, facts


# ---- streaming: one layer from a checkpoint's tensors, and back ------------------------------------------

LAYER_TENSORS = ("qweight", "qzeros", "scales", "g_idx", "bias")


def layer_from_tensors(tensors: dict, qc: dict) -> nn.Module:
    """A TorchLinear holding one layer's checkpoint tensors ({"qweight": ..., "qzeros": ..., ...}, as stored under
    `qc`), with true (v2) zero points in memory, as prepare_gptq_model leaves a loaded layer."""
    _, TorchLinear = _qlinear_classes()
    bits = int(qc["bits"])
    qweight = tensors["qweight"]
    K, N = qweight.shape[0] * 32 // bits, qweight.shape[1]
    _check_layer_tensors(tensors, K, N, bits, int(qc["group_size"]))
    layer = TorchLinear(bits=bits, group_size=int(qc["group_size"]), sym=bool(qc.get("sym", True)),
                        desc_act=bool(qc.get("desc_act")), in_features=K, out_features=N,
                        bias="bias" in tensors, pack_dtype=torch.int32, register_buffers=True)
    for name in LAYER_TENSORS:
        if name in tensors:
            setattr(layer, name, tensors[name])
    v1 = (qc.get("checkpoint_format") or qc.get("format") or "gptq").lower() == "gptq"
    layer.qzero_format(format=1 if v1 else 2)
    _normalise_zero_format(layer, zeros_may_be_v1=v1)
    layer.post_init()
    return layer


def _check_layer_tensors(tensors: dict, K: int, N: int, bits: int, group_size: int) -> None:
    """A layer's stored tensors agree with each other and with the config (a damaged or edited checkpoint would
    otherwise fail deep in a kernel, or index out of range): shapes, dtypes, and every g_idx entry a real group."""
    G = (K + group_size - 1) // group_size if group_size > 0 else 1
    want = {"qweight": ((K * bits // 32, N), torch.int32), "qzeros": ((G, N * bits // 32), torch.int32),
            "scales": ((G, N), None)}
    for name, (shape, dtype) in want.items():
        t = tensors.get(name)
        if t is None or tuple(t.shape) != shape or (dtype is not None and t.dtype != dtype):
            got = "missing" if t is None else f"{tuple(t.shape)} {t.dtype}"
            raise ValueError(f"the layer's {name} is {got}, not {shape} as its qweight and the config ({bits}-bit, "
                             f"group size {group_size}) say: the checkpoint is damaged.")
    g_idx = tensors.get("g_idx")
    if g_idx is not None:
        if tuple(g_idx.shape) != (K,) or g_idx.is_floating_point():
            raise ValueError(f"the layer's g_idx is {tuple(g_idx.shape)} {g_idx.dtype}, not ({K},) integers: the "
                             "checkpoint is damaged.")
        if K and (int(g_idx.min()) < 0 or int(g_idx.max()) >= G):
            raise ValueError(f"the layer's g_idx names group {int(g_idx.max()) if int(g_idx.max()) >= G else int(g_idx.min())}"
                             f" of {G}: the checkpoint is damaged.")


def layer_tensors(layer: nn.Module, qc_out: dict) -> dict:
    """One layer's tensors as a checkpoint with `qc_out` (checkpoint_config's) stores them."""
    v1 = qc_out["checkpoint_format"] == "gptq"
    out = {name: getattr(layer, name) for name in LAYER_TENSORS if getattr(layer, name, None) is not None}
    out["qzeros"] = zeros_v2_to_v1(layer.qzeros.data, layer.bits) if v1 else layer.qzeros.data
    return out


def true_zeros_of(tensors: dict, qc: dict) -> torch.Tensor:
    """True zero points [G, N] (uint8) from a layer's stored tensors, as loading makes them: a classic (v1) stored
    maxq wraps to 0 (gptqmodel's packed-word add), so such a layer does not fit the classic format again."""
    bits = int(qc["bits"])
    z = unpack_qzeros(tensors["qzeros"], bits)[:, : tensors["scales"].shape[1]]
    v1 = (qc.get("checkpoint_format") or qc.get("format") or "gptq").lower() == "gptq"
    return ((z.to(torch.int16) + 1) & ((1 << bits) - 1)).to(torch.uint8) if v1 else z


def _quantize_config_json(qc: dict) -> dict:
    """What GPTQModel's own save writes to quantize_config.json (its QuantizeConfig.to_dict), minus run-time noise."""
    meta = dict(qc.get("meta") or {})
    for key in ("damp_percent", "true_sequential", "act_group_aware"):
        if qc.get(key) is not None:
            meta.setdefault(key, qc[key])
    return {"bits": qc["bits"], "group_size": qc["group_size"], "desc_act": qc["desc_act"], "sym": qc["sym"],
            "lm_head": False, "method": "gptq", "quant_method": "gptq", "format": qc["format"],
            "checkpoint_format": qc["format"], "pack_dtype": "int32", "meta": meta}


# ---- which kernels can serve a checkpoint ---------------------------------------------------------------

GPTQMODEL_MODULES = ("marlin", "machete", "exllamav2", "tritonv2", "torch_fused", "torch_aten_kernel", "torch")
GPTQMODEL_KERNELS = ("MarlinLinear", "MacheteLinear", "ExllamaV2Linear", "TritonV2Linear", "TorchFusedLinear",
                     "TorchAtenLinear", "TorchLinear")


def serving_grid(qc: dict) -> serving.Grid:
    return serving.Grid(int(qc["bits"]), int(qc["group_size"]), bool(qc["sym"]),
                        bool(qc.get("desc_act")) and qc["group_size"] != -1)


def kernels(qc: dict) -> list[tuple[str, str, bool]]:
    """(kernel, devices, can serve) for a GPTQ quantization config: gptqmodel's (from the installed kernels' own
    declarations) and the GPU servers' (their rules: serving.py)."""
    def supports(cls) -> bool:
        return (qc["bits"] in getattr(cls, "SUPPORTS_BITS", [qc["bits"]])
                and bool(qc["sym"]) in getattr(cls, "SUPPORTS_SYM", [True, False])
                and qc["group_size"] in getattr(cls, "SUPPORTS_GROUP_SIZE", [qc["group_size"]])
                and bool(qc.get("desc_act")) in getattr(cls, "SUPPORTS_DESC_ACT", [True, False]))

    return gptqmodel_kernels(GPTQMODEL_MODULES, GPTQMODEL_KERNELS, supports) + serving.rows("gptq", serving_grid(qc))


def fast_path_note(qc: dict) -> Optional[str]:
    """Which GPU server refuses this checkpoint, why, and the conversion it serves; or None."""
    return serving.note("gptq", serving_grid(qc))


def load_config(qc: dict):
    """GPTQConfig that loads a checkpoint with TorchLinear ("gptq_torch"); the rest comes from its config.json."""
    from transformers import GPTQConfig

    return GPTQConfig(bits=qc["bits"], backend="gptq_torch")


def describe(qc: dict) -> list[tuple[str, object]]:
    fmt = qc.get("checkpoint_format") or qc.get("format") or "gptq"
    what = "classic, every loader" if fmt == "gptq" else "true zero points: gptqmodel-based loaders only"
    return [("kind", "GPTQ checkpoint"), ("format", f"{fmt} ({what})"), ("bits", qc["bits"]),
            ("group size", qc["group_size"]), ("symmetric", qc.get("sym")), ("act-order (desc_act)", qc.get("desc_act"))]


class GptqFormat(BuildsLayers, Streams, Format):
    name, quant_method = NAME, "gptq"
    requires = (("gptqmodel", "gptq"), ("optimum", "gptq"))
    layer_tensor_names, zero_point_tensors = LAYER_TENSORS, ("qzeros", "scales")
    is_layer, dispatch = staticmethod(is_gptq_layer), staticmethod(dispatch_gptq)
    prepare_model, model_is = staticmethod(prepare_gptq_model), staticmethod(model_is_gptq)
    checkpoint = staticmethod(gptq_checkpoint)
    load_config, kernels, describe = staticmethod(load_config), staticmethod(kernels), staticmethod(describe)
    fast_path_note = staticmethod(fast_path_note)
    grid_problem = staticmethod(grid_problem)
    build_layer = staticmethod(build_layer)
    new_config = staticmethod(new_config)
    layer_from_tensors, layer_tensors = staticmethod(layer_from_tensors), staticmethod(layer_tensors)
    true_zeros_of, checkpoint_config = staticmethod(true_zeros_of), staticmethod(checkpoint_config)


FORMAT = GptqFormat()
