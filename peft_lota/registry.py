"""Registration of peft_lota's methods with PEFT, one mechanism for all of them, without editing PEFT's files.

PEFT's `register_peft_method` only accepts names already in its closed `PeftType` enum, so each
method's member is added to the enum first (`peft_type`, at import, before any config is made), then
`register()` registers every method in METHODS. Both steps are idempotent: importing peft_lota twice,
or reloading it, registers each method once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from peft.utils import PeftType


def peft_type(name: str) -> PeftType:
    """The PeftType member `name`, added to the enum if PEFT does not have it."""
    if name in PeftType.__members__:
        return PeftType[name]
    member = str.__new__(PeftType, name)
    member._name_ = name
    member._value_ = name
    member.__objclass__ = PeftType
    member._sort_order_ = len(PeftType._member_names_)
    PeftType._member_map_[name] = member
    PeftType._value2member_map_[name] = member
    PeftType._member_names_.append(name)
    type.__setattr__(PeftType, name, member)
    return member


LOTA_PEFT_TYPE = peft_type("LOTA")
L4Q_PEFT_TYPE = peft_type("L4Q")


@dataclass(frozen=True)
class Method:
    """A PEFT method of peft_lota: its PeftType name, parameter prefix, and where its classes live."""

    name: str
    prefix: str
    classes: Callable[[], tuple[type, type]]  # () -> (config class, tuner model class), imported late


def _lota_classes():
    from .lota.config import LotaConfig
    from .lota.model import LotaModel

    return LotaConfig, LotaModel


def _l4q_classes():
    from .l4q.config import L4QConfig
    from .l4q.model import L4QModel

    return L4QConfig, L4QModel


METHODS: tuple[Method, ...] = (Method("LOTA", "lota_", _lota_classes), Method("L4Q", "l4q_", _l4q_classes))


def _count_quantized_weights() -> None:
    """PeftModel.get_nb_trainable_parameters counts parameters only, and a quantized model's weights are buffers
    (GPTQ's packed qweight): print_trainable_parameters then reports most of the model as trainable. For models
    of peft_lota's methods, count each quantized layer's weights too (in_features x out_features)."""
    from peft import PeftModel

    original = PeftModel.get_nb_trainable_parameters
    if getattr(original, "_peft_lota", False):
        return

    def get_nb_trainable_parameters(self):
        trainable, total = original(self)
        if str(getattr(self, "peft_type", "")) in {m.name for m in METHODS} or getattr(self, "peft_type", None) in {
                peft_type(m.name) for m in METHODS}:
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

    for method in METHODS:
        config_cls, model_cls = method.classes()
        member = peft_type(method.name)
        if PEFT_TYPE_TO_TUNER_MAPPING.get(member) is model_cls:
            continue
        for mapping in (PEFT_TYPE_TO_TUNER_MAPPING, PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING):
            mapping.pop(member, None)
        register_peft_method(name=method.name.lower(), config_cls=config_cls, model_cls=model_cls,
                             prefix=method.prefix)
