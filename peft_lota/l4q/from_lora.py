"""An L4Q model that starts from a LoRA you already trained, so that a short quantization-aware run ends in an
exactly merged quantized checkpoint.

A LoRA trained on a quantized model cannot be merged into it (PEFT refuses), and merging it into the dequantized
weights and quantizing again loses much of what it learned at low bit widths. `l4q_from_lora` puts the same
A and B inside L4Q's quantizer on the same base: the model then computes W_q = Q(W0 + scaling B A) on the
base's own grid, and training it for a fraction of the LoRA's steps teaches A, B and the scales to live with
the rounding; `merge_and_unload()` then writes exactly what was trained.

To ship a LoRA as it is, `peft_lota.merge_lora` does better (benchmarks/README.md: the conversion re-rounds every
weight the quantizer (e.g. GPTQ) placed with error feedback, while merge_lora rounds the LoRA's update with error feedback onto the
base's grid). This route is for going on training on the grid from a LoRA's starting point.
"""

from __future__ import annotations

import logging
import os
from typing import Optional, Union

import torch
from torch import nn

from .config import L4QConfig
from .layer import L4QLayer

logger = logging.getLogger(__name__)


def l4q_from_lora(model: nn.Module, lora: Union[None, str, os.PathLike, nn.Module] = None, *,
                  adapter_name: Optional[str] = None, learn_scales: bool = True, **config_kwargs):
    """Build an L4Q PeftModel whose LoRA starts as the given LoRA adapter, on the same base model.

    Args:
        model: a PeftModel holding a LoRA adapter (then `lora` is None), or the base model (quantized or
            full precision) that the LoRA adapter in `lora` was trained on.
        lora: None, or the folder of a saved LoRA adapter (what `PeftModel.save_pretrained` wrote), or a PeftModel.
        adapter_name: which LoRA adapter to start from (default: the active one).
        learn_scales, config_kwargs: passed to L4QConfig (e.g. bits/group_size/sym for a full-precision base).

    The LoRA PeftModel is unwrapped (its base model is reused, not copied). LoRA's scaling is kept exactly
    (L4Q's lora_alpha = LoRA's scaling * r, rsLoRA included). Refused: DoRA, LoRA-trained biases, and LoRA on
    layers L4Q cannot quantize; lora_dropout has no place inside the quantizer and is dropped (said in the log).
    """
    from peft import PeftModel, get_peft_model
    from peft.tuners.lora import LoraConfig, LoraLayer
    from peft.utils import ModulesToSaveWrapper

    if lora is not None and not isinstance(lora, nn.Module):
        lora = PeftModel.from_pretrained(model, str(lora), is_trainable=False)
    lora_model = lora if lora is not None else model
    if not isinstance(lora_model, PeftModel):
        raise TypeError("l4q_from_lora needs a PeftModel with a LoRA adapter, or a base model and the folder of a "
                        "saved LoRA adapter: l4q_from_lora(base_model, 'path/to/lora').")
    name = adapter_name or lora_model.active_adapter
    config = lora_model.peft_config.get(name)
    if not isinstance(config, LoraConfig):
        raise TypeError(f"adapter {name!r} is a {type(config).__name__}, not a LoRA adapter.")
    if config.use_dora:
        raise ValueError("l4q_from_lora cannot start from a DoRA adapter: its magnitude vector has no place in L4Q.")
    if config.bias != "none":
        raise ValueError(f"l4q_from_lora cannot start from a LoRA that trained biases (bias={config.bias!r}).")
    if config.lora_dropout:
        logger.warning("l4q_from_lora: lora_dropout=%s is dropped: L4Q's LoRA sits inside the quantizer.",
                       config.lora_dropout)

    prefix = "base_model.model."
    factors, scaling = {}, None
    for module_name, module in lora_model.named_modules():
        if isinstance(module, LoraLayer) and name in module.lora_A:
            factors[module_name.removeprefix(prefix)] = (module.lora_A[name].weight.detach().clone(),
                                                         module.lora_B[name].weight.detach().clone())
            scaling = module.scaling[name] if scaling is None else scaling
    if not factors:
        raise ValueError(f"the PeftModel holds no LoRA layer of adapter {name!r}.")
    saved = {}
    for module_name, module in lora_model.named_modules():  # trained copies of modules_to_save
        if isinstance(module, ModulesToSaveWrapper) and name in module.modules_to_save:
            saved[module_name.removeprefix(prefix)] = {k: v.detach().clone()
                                                       for k, v in module.modules_to_save[name].state_dict().items()}

    base = lora_model.unload()
    r = config.r
    l4q_config = L4QConfig(r=r, lora_alpha=scaling * r, target_modules=sorted(factors), learn_scales=learn_scales,
                           modules_to_save=config.modules_to_save, task_type=config.task_type or "CAUSAL_LM",
                           base_model_name_or_path=config.base_model_name_or_path, **config_kwargs)
    l4q = get_peft_model(base, l4q_config)
    layers = {n.removeprefix(prefix): m for n, m in l4q.named_modules() if isinstance(m, L4QLayer)}
    missing = sorted(set(factors) - set(layers))
    if missing:
        raise ValueError(f"L4Q did not adapt {missing[:3]}: every LoRA layer must be a layer L4Q can quantize.")
    with torch.no_grad():
        for module_name, (A, B) in factors.items():
            layer = layers[module_name]
            layer.l4q_A["default"].copy_(A.to(layer.l4q_A["default"].device))
            layer.l4q_B["default"].copy_(B.to(layer.l4q_B["default"].device))
        for module_name, state in saved.items():
            wrapper = l4q.get_submodule(prefix + module_name)
            wrapper.modules_to_save["default"].load_state_dict(state)
    return l4q
