"""peft_lota's members of PEFT's `PeftType` enum, added before any config is made.

PEFT's `register_peft_method` only accepts names already in its closed `PeftType` enum, so each method's member is
added to it here (idempotent: importing peft_lota twice, or reloading it, adds each member once). The configs import
this module, and registry.py imports the configs: no import goes the other way.
"""

from __future__ import annotations

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
