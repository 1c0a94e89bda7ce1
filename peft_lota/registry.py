"""peft_lota's methods, as PEFT and the upper layers (command line, fine-tuning script) see them.

`METHODS` lists every method once: its PeftType name, parameter prefix, config, tuner model and layer classes.
`register()` registers each with PEFT (idempotent: a reload replaces stale classes). Code above the methods asks
this table (`method(...)`, `tuner_layer_classes()`) instead of naming LoTA or L4Q.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from .l4q.config import L4QConfig
from .l4q.layer import L4QLayer
from .l4q.model import L4QModel
from .lota.config import LotaConfig
from .lota.layer import LotaLayer
from .lota.model import LotaModel
from .peft_types import peft_type


@dataclass(frozen=True)
class Method:
    """A PEFT method of peft_lota."""

    name: str  # PeftType member, and `peft_type` in adapter_config.json ("LOTA")
    title: str  # how messages name it ("LoTA")
    prefix: str  # of its parameters' names ("lota_")
    config_class: type
    model_class: type
    layer_class: type
    needs_quantized_base: bool  # True: it moves a quantized checkpoint's codes (False: it also quantizes full precision)

    @property
    def cli_name(self) -> str:
        return self.name.lower()

    def describe(self, config: dict) -> list[tuple[str, object]]:
        """(key, value) rows of an adapter_config.json's method settings (the command line's inspect)."""
        return self.config_class.describe_settings(config)


METHODS: tuple[Method, ...] = (
    Method("LOTA", "LoTA", "lota_", LotaConfig, LotaModel, LotaLayer, needs_quantized_base=True),
    Method("L4Q", "L4Q", "l4q_", L4QConfig, L4QModel, L4QLayer, needs_quantized_base=False),
)


def method(name: str) -> Optional[Method]:
    """The method whose PeftType name or command-line name is `name` ("LOTA" or "lota"), or None."""
    return next((m for m in METHODS if name in (m.name, m.cli_name)), None)


def tuner_layer_classes() -> tuple[type, ...]:
    return tuple(m.layer_class for m in METHODS)


def _count_quantized_weights() -> None:
    """Why this patch of PEFT exists: PeftModel.get_nb_trainable_parameters counts parameters only, and a quantized
    model's weights are buffers (GPTQ's packed qweight) or int8 tensors, so print_trainable_parameters would report
    most of the model as trainable. PEFT has no hook for it; for models of peft_lota's methods, each quantized layer's
    in_features x out_features weights are added to the total. Other PeftModels are untouched."""
    from peft import PeftModel

    original = PeftModel.get_nb_trainable_parameters
    if getattr(original, "_peft_lota", False):
        return
    ours = {peft_type(m.name) for m in METHODS}

    def get_nb_trainable_parameters(self):
        trainable, total = original(self)
        if getattr(self, "peft_type", None) in ours:
            from . import formats

            total += sum(m.in_features * m.out_features for m in self.modules() if formats.is_quantized_layer(m))
        return trainable, total

    get_nb_trainable_parameters._peft_lota = True
    PeftModel.get_nb_trainable_parameters = get_nb_trainable_parameters


def register() -> None:
    """Register every method of METHODS with PEFT (idempotent; a reload replaces stale classes)."""
    _count_quantized_weights()
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
    from peft.utils import register_peft_method

    for m in METHODS:
        member = peft_type(m.name)
        if PEFT_TYPE_TO_TUNER_MAPPING.get(member) is m.model_class:
            continue
        for mapping in (PEFT_TYPE_TO_TUNER_MAPPING, PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING):
            mapping.pop(member, None)
        register_peft_method(name=m.name.lower(), config_cls=m.config_class, model_cls=m.model_class, prefix=m.prefix)
