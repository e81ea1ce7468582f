"""Register this project's tuners as peft methods (DESIGN contract 3).

peft has no plugin mechanism: ``register_peft_method`` accepts only names that are already members
of the closed ``PeftType`` enum. We add the member at import time (the one place that touches the
enum's private tables), then call the official function. Both steps are idempotent, so importing
``mllm`` twice, or under two module names, is harmless. No tuner is imported here: each tuner
package registers itself (``mllm/tuners/<name>/__init__.py``).
"""

from __future__ import annotations

from peft.utils.peft_types import PeftType


def extend_peft_type(name: str) -> PeftType:
    """Return ``PeftType[NAME]``, adding it to the enum first if peft does not have it."""
    value = name.upper()
    if value in PeftType.__members__:
        return PeftType[value]
    member = str.__new__(PeftType, value)
    member._name_ = value
    member._value_ = value
    PeftType._member_map_[value] = member
    PeftType._member_names_.append(value)
    PeftType._value2member_map_[value] = member
    type.__setattr__(PeftType, value, member)  # PeftType.MOKA
    return member


def register_peft_method(name: str, config_cls, model_cls) -> None:
    """peft's ``register_peft_method`` for a name peft's enum lacks (idempotent). Each tuner package
    calls it on import, as peft's own packages register themselves."""
    from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING
    from peft.utils import register_peft_method as register

    peft_type = extend_peft_type(name)
    registered = PEFT_TYPE_TO_TUNER_MAPPING.get(peft_type)
    if registered is model_cls:
        return
    if registered is not None:
        # Another package (or a future peft) owns this name: refuse to shadow it silently.
        if registered.__module__ != model_cls.__module__ or registered.__name__ != model_cls.__name__:
            raise RuntimeError(f"peft method {name!r} is already registered by {registered.__module__}; "
                               f"mllm cannot register its own {model_cls.__name__} under that name")
        return  # same class imported under another module object (e.g. a reload)
    register(name=name, config_cls=config_cls, model_cls=model_cls, prefix=model_cls.prefix)
