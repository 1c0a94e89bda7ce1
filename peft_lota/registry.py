"""Registration of the LOTA method with PEFT, without editing PEFT's files.

PEFT's `register_peft_method` only accepts names already in its closed `PeftType` enum, so we add
the member ourselves first. Both steps are idempotent: importing peft_lota twice, or reloading
it, registers once.
"""

from __future__ import annotations

from peft.utils import PeftType

NAME = "LOTA"


def _extend_peft_type() -> PeftType:
    if NAME in PeftType.__members__:
        return PeftType[NAME]
    member = str.__new__(PeftType, NAME)
    member._name_ = NAME
    member._value_ = NAME
    member.__objclass__ = PeftType
    member._sort_order_ = len(PeftType._member_names_)
    PeftType._member_map_[NAME] = member
    PeftType._value2member_map_[NAME] = member
    PeftType._member_names_.append(NAME)
    type.__setattr__(PeftType, NAME, member)
    return member


LOTA_PEFT_TYPE = _extend_peft_type()


def register() -> None:
    from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING
    from peft.utils import register_peft_method

    from .config import LotaConfig
    from .model import LotaModel

    if PEFT_TYPE_TO_TUNER_MAPPING.get(LOTA_PEFT_TYPE) is LotaModel:
        return
    if LOTA_PEFT_TYPE in PEFT_TYPE_TO_TUNER_MAPPING:  # a reload of peft_lota: replace the stale classes
        from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING

        for mapping in (PEFT_TYPE_TO_TUNER_MAPPING, PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING):
            mapping.pop(LOTA_PEFT_TYPE, None)
    register_peft_method(name=NAME.lower(), config_cls=LotaConfig, model_cls=LotaModel, prefix="lota_")
