"""LoTA on gptqmodel's GPTQ layers: reading and writing codes, and getting layers into a trainable layout.

LoTA needs the standard GPTQ tensor layout (qweight/qzeros/scales/g_idx, spec section 1) to read
codes and write merged ones. gptqmodel's kernels differ in what they do with it:

- `TorchLinear` ("gptq_torch") keeps it, trains, and runs on every device: our target kernel.
- `TorchAtenLinear` / `TorchCpuAvx512Linear` / `TorchFusedLinear` (the default CPU kernels) keep it
  until their first inference call, then repack into a private layout (and the AVX512 one refuses
  `train()`): while still untouched, we move them to `TorchLinear`, losslessly.
- Marlin, Machete, ExLlama, BitBLAS, ... repack at load: we cannot read their codes; the error says
  how to load the model instead.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Optional

import torch
from torch import nn

from . import codec
from .layer import LotaLayer
from .ternary import LotaState, group_layout

logger = logging.getLogger(__name__)

_RELOAD_HINT = (
    "Load the model with a layout-keeping kernel, e.g. AutoModelForCausalLM.from_pretrained(path, "
    "quantization_config=GPTQConfig(bits=<bits>, backend='gptq_torch')), and call get_peft_model before running "
    "inference with it."
)


def _qlinear_classes():
    from gptqmodel.nn_modules.qlinear import BaseQuantLinear
    from gptqmodel.nn_modules.qlinear.torch import TorchLinear

    return BaseQuantLinear, TorchLinear


def is_gptq_layer(module: nn.Module) -> bool:
    try:
        BaseQuantLinear, _ = _qlinear_classes()
    except ImportError:  # gptqmodel not installed: no GPTQ layers can exist
        return False
    return isinstance(module, BaseQuantLinear) and hasattr(module, "qweight")


def _layout_problem(name: str, module: nn.Module) -> Optional[str]:
    """Why this GPTQ layer's buffers are not in the standard layout, or None if they are."""
    from gptqmodel.nn_modules.qlinear.torch_aten_kernel import TorchAtenLinear
    from gptqmodel.nn_modules.qlinear.torch_fused import TorchFusedLinear

    _, TorchLinear = _qlinear_classes()
    cls = type(module).__name__
    if getattr(module, "planar", False) or getattr(module, "bits", None) not in codec.SUPPORTED_BITS:
        return (f"layer {name} ({cls}) holds {getattr(module, 'bits', '?')}-bit codes in gptqmodel's planar layout; "
                f"LoTA supports {codec.SUPPORTED_BITS} bits in the standard GPTQ layout.")
    if getattr(module, "_cpu_transformed", False) or getattr(module, "linear_mode", None) == "inference":
        return (f"layer {name} ({cls}) has already repacked its weights into a private layout for fast CPU "
                "inference (it does so on its first call under torch.inference_mode / no_grad). " + _RELOAD_HINT)
    if isinstance(module, (TorchLinear, TorchAtenLinear, TorchFusedLinear)):
        return None
    return f"layer {name} uses the {cls} kernel, which repacks GPTQ weights into its own layout at load. " + _RELOAD_HINT


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


def checkpoint_format(model: nn.Module) -> str:
    """"gptq" (v1, zeros stored as z - 1) or "gptq_v2" (true zeros), as the model was loaded."""
    qcfg = getattr(getattr(model, "config", None), "quantization_config", None)
    get = (lambda k: qcfg.get(k)) if isinstance(qcfg, dict) else (lambda k: getattr(qcfg, k, None))
    return get("checkpoint_format") or get("format") or "gptq"


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
    _clear_kernel_caches(module)


def _clear_kernel_caches(module: nn.Module) -> None:
    """gptqmodel kernels cache decoded zeros and g_idx; drop them after the buffers change."""
    for clear in ("_stream_reset_cache", "clear_weight_cache"):
        if callable(getattr(module, clear, None)):
            getattr(module, clear)()


def prepare_gptq_model(model: nn.Module) -> int:
    """Move every GPTQ layer of `model` to TorchLinear with v2 zeros in memory. Returns how many moved.

    All GPTQ layers, not only the targeted ones: Trainer calls model.train() every step, and a
    kernel that refuses train() anywhere in the model would crash it.
    """
    _, TorchLinear = _qlinear_classes()
    zeros_may_be_v1 = checkpoint_format(model) == "gptq"
    problems, moved = [], 0
    for name, module in list(model.named_modules()):
        if not is_gptq_layer(module) or isinstance(module, LotaLayer):
            continue
        problem = _layout_problem(name, module)
        if problem:
            problems.append(problem)
            continue
        if type(module) is not TorchLinear:
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            module = _to_torch_linear(module)
            setattr(parent, child, module)
            moved += 1
        _normalise_zero_format(module, zeros_may_be_v1)
    if problems:
        raise ValueError("LoTA cannot use this model's GPTQ layers as loaded:\n- " + "\n- ".join(problems[:3])
                         + (f"\n(and {len(problems) - 3} more)" if len(problems) > 3 else ""))
    if moved:
        logger.info("peft_lota: moved %d GPTQ layers to the trainable, layout-keeping TorchLinear kernel.", moved)
    return moved


class GPTQLotaLinear(LotaLayer):
    """LoTA on a gptqmodel GPTQ layer in the standard layout (after prepare_gptq_model)."""

    def read_quant_state(self) -> LotaState:
        base = self.base_layer
        bits, qweight = base.bits, base.qweight.detach()  # this storage, even if a merge swaps in another

        def codes_rows(k0: int, k1: int) -> torch.Tensor:  # rows k0..k1-1: whole words (row_align)
            return codec.unpack_qweight(qweight[k0 * bits // 32 : k1 * bits // 32], bits)

        zeros, g_idx, layout = self._decoded_metadata()
        return LotaState(None, zeros, base.scales, g_idx, (1 << bits) - 1, base.bias, codes_rows=codes_rows,
                         in_features=self.in_features, row_align=32 // math.gcd(bits, 32), layout=layout)

    def _decoded_metadata(self):
        """Zero points, g_idx and its group layout, decoded once and reused while qzeros and g_idx are unchanged.

        Every forward needs them and training never changes them; a merge swaps a new qzeros in (new
        storage) and in-place writes bump the tensor version, either of which invalidates this cache.
        """
        base = self.base_layer
        sources = (base.qzeros, base.g_idx, base.scales)
        cached = self.__dict__.get("_lota_metadata")
        # The cache holds aliases of its sources: their storage cannot be freed and reused at the same address.
        if cached is None or any(a.data_ptr() != t.data_ptr() or a.shape != t.shape or v != t._version
                                 for (a, v), t in zip(cached[0], sources)):
            # Zeros are true (v2) zeros in memory: prepare_gptq_model made sure.
            zeros = codec.unpack_qzeros(base.qzeros, base.bits)[:, : self.out_features]
            g_idx = base.g_idx.long()
            key = tuple((t.detach(), t._version) for t in sources)
            layout = group_layout(g_idx, base.scales.shape[0])
            cached = self.__dict__["_lota_metadata"] = (key, zeros, g_idx, layout)
        return cached[1:]

    def encode_quant_state(self, codes: torch.Tensor, zeros: torch.Tensor) -> dict[str, torch.Tensor]:
        base = self.base_layer  # zeros are v2 in memory (read_quant_state made sure)
        return {"qweight": codec.pack_qweight(codes, base.bits).to(base.qweight.device),
                "qzeros": codec.pack_qzeros(zeros, base.bits).to(base.qzeros.device)}

    def snapshot_quant_buffers(self) -> dict[str, torch.Tensor]:
        return {"qweight": self.base_layer.qweight.data, "qzeros": self.base_layer.qzeros.data}

    def restore_quant_buffers(self, buffers: dict[str, torch.Tensor]) -> None:
        base = self.base_layer
        for name, value in buffers.items():
            # `.data =` swaps the storage of the registered buffer (whoever holds the buffer sees the
            # new values) without copying, and leaves the tensors of a snapshot untouched.
            getattr(base, name).data = value
        _clear_kernel_caches(base)


def dispatch_gptq(target: nn.Module, adapter_name: str, config: Any, **kwargs) -> Optional[nn.Module]:
    """The LoTA layer for a gptqmodel GPTQ layer, or None if `target` is not one."""
    if not is_gptq_layer(target):
        return None
    problem = _layout_problem(kwargs.get("current_key", type(target).__name__), target)
    if problem:
        raise ValueError(problem)
    return GPTQLotaLinear(target, adapter_name, r=config.r, omega=config.omega, offset=config.offset,
                          init_seed=config.init_seed, **kwargs)
