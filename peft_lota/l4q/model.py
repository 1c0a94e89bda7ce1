"""L4QModel: the PEFT tuner that injects L4Q layers, merges them into quantized layers and unloads."""

from __future__ import annotations

from typing import Optional

from torch import nn

from .. import formats
from ..tuner import QuantTuner
from .config import L4QConfig
from .layer import L4QLayer, L4QSettings


class L4QModel(QuantTuner):
    """Creates an L4Q model from a full-precision or a quantized transformers model (use `peft.get_peft_model`).

    From a quantized model, W0 is each layer's dequantized weight and the grid is the checkpoint's, and
    `merge_and_unload()` returns a model of the same format; from a full-precision model, W0 is each nn.Linear's
    weight, the grid comes from L4Q's initialisation with the config's bits, group_size and sym, and
    `merge_and_unload()` returns a model of the config's `format` (GPTQ by default).
    """

    prefix: str = "l4q_"
    tuner_layer_cls = L4QLayer
    method_name = "L4Q"

    def _quantized_base(self) -> bool:
        return formats.model_format(self.model) is not None or any(
            formats.is_quantized_layer(m) for m in self.model.modules())

    def _adaptable(self, module: nn.Module) -> bool:
        if self._quantized_base():
            return formats.is_quantized_layer(module)
        return isinstance(module, nn.Linear)

    def _all_linear_error(self) -> str:
        return (f"L4QConfig(target_modules='all-linear') found no linear layer to adapt: a quantized "
                f"({formats.format_list()}) model needs quantized layers, a full-precision model nn.Linear layers "
                "(other than the output head).")

    @staticmethod
    def _settings(config: L4QConfig) -> L4QSettings:
        return L4QSettings(r=config.r, scaling=config.scaling, learn_scales=config.learn_scales,
                           scale_gradient=config.scale_gradient, anchor_codes=config.anchor_codes,
                           scale_rate=float(config.scale_rate))

    def _create_and_replace(self, config: L4QConfig, adapter_name: str, target: nn.Module, target_name: str,
                            parent: nn.Module, current_key: str, **optional_kwargs) -> None:
        if isinstance(target, L4QLayer):
            if target.quant is None and (target.quantizer, target.target_format_name) != (
                    config.quantizer(), self._target_format(config).name):
                raise ValueError(f"L4Q adapter {adapter_name!r} asks for a (bits, group_size, sym) = "
                                 f"{config.quantizer()} {self._target_format(config).name} grid on {current_key}, "
                                 f"which already has {target.quantizer} {target.target_format_name}: adapters on one "
                                 "layer share its grid and format.")
            target.update_layer(adapter_name, self._settings(config), init_seed=config.init_seed)
            return
        quant = formats.dispatch(target, current_key)
        if quant is not None or isinstance(target, nn.Linear):
            self._check_base(config, current_key, target, quant)
        if quant is not None:
            self._check_grid(config, quant, current_key)
            new = L4QLayer(target, quant, adapter_name, self._settings(config), init_seed=config.init_seed,
                           current_key=current_key)
        elif isinstance(target, nn.Linear) and not self._quantized_base():
            new = L4QLayer(target, None, adapter_name, self._settings(config), quantizer=config.quantizer(),
                           target_format=self._target_format(config), init_seed=config.init_seed,
                           current_key=current_key)
        else:
            kind = "a quantized model" if self._quantized_base() else "a full-precision model"
            raise TypeError(
                f"L4Q cannot adapt module {current_key!r} of type {type(target).__name__} in {kind}: it adapts the "
                f"quantized ({formats.format_list()}) layers of a quantized model, or the nn.Linear layers of a "
                "full-precision model. Remove it from target_modules, or use target_modules='all-linear'.")
        if adapter_name not in self.active_adapters:
            new.requires_grad_(False)
        self._replace_module(parent, target_name, new, target)

    @staticmethod
    def _target_format(config: L4QConfig):
        """From full precision: the format a merge builds (config.format, else formats.default_build_format()), if it can build layers."""
        fmt = formats.by_name(config.format) if config.format else formats.default_build_format()
        if not fmt.can_hold_trained_scales:
            targets = ", ".join(f.title for f in formats.FORMATS if f.can_hold_trained_scales)
            raise ValueError(f"L4QConfig(format={config.format!r}): L4Q from full precision cannot write {fmt.title} "
                             f"layers; choose one of {targets} (and `peft-lota convert` the merged model, where the "
                             "target holds its grid).")
        return fmt

    @staticmethod
    def _check_grid(config: L4QConfig, quant, key: str) -> None:
        """From a quantized model the grid is the checkpoint's: a config that asks for another one is refused."""
        if config.format is not None and config.format != quant.format_name:
            raise ValueError(f"L4QConfig(format={config.format!r}) but {key} is a {quant.format_name} layer: from a "
                             "quantized model L4Q keeps the checkpoint's format. Leave format unset (None).")
        for name, value in quant.grid_settings().items():
            asked = getattr(config, name)
            if asked is not None and asked != value:
                fmt = quant.format_name.upper()
                raise ValueError(f"L4QConfig({name}={asked!r}) but the {fmt} layer {key} has {name}={value!r}: from a "
                                 f"quantized model L4Q keeps the checkpoint's grid. Leave {name} unset (None).")

    def _replace_module(self, parent, child_name, new_module, child) -> None:
        # Unloading a layer merged on an nn.Linear base: the quantized layer the merge built replaces it.
        if isinstance(child, L4QLayer) and child.merged_layer is not None and new_module is child.base_layer:
            new_module = child.merged_layer
        setattr(parent, child_name, new_module)

    def _after_unload(self, model: nn.Module) -> None:
        """From full precision, the unloaded model now holds quantized layers: give it the config loaders read."""
        if formats.model_format(model) is not None:
            return
        config = self.peft_config[self.active_adapters[0]]  # (adapters on one layer share its grid and format)
        fmt = next((f for f in formats.FORMATS if any(f.is_layer(m) for m in model.modules())), None)
        if fmt is not None and fmt.can_build:  # (GGUF layers come from a file, never from here)
            model.config.quantization_config = fmt.new_config(*config.quantizer())

    def _method_card(self, config: Optional[L4QConfig]) -> dict:
        return {
            "method": "L4Q", "method_url": "https://arxiv.org/abs/2402.04902", "method_tag": "l4q",
            "summary": "A LoRA was trained through the quantizer (quantization-aware training with learnable scales); "
                       "the merge wrote the quantized result, the codes and the trained scales, exactly as training "
                       "computed them.",
            "settings": {"L4Q rank r": getattr(config, "r", None), "L4Q lora_alpha": getattr(config, "lora_alpha", None),
                         "L4Q learned scales": getattr(config, "learn_scales", None),
                         "L4Q scale rate": getattr(config, "scale_rate", None),
                         "L4Q anchored codes": getattr(config, "anchor_codes", None)},
        }
