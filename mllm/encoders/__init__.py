"""Registry of frozen media encoders: ``type`` name in the config -> encoder class.

New encoders (BEATs, Whisper, ...) plug in with ``@register_encoder("name")`` and need no
change to the model code.
"""

from __future__ import annotations

from mllm.encoders.base import MediaEncoder, MediaPreprocessor
from mllm.errors import ConfigError

ENCODER_REGISTRY: dict[str, type[MediaEncoder]] = {}


def register_encoder(name: str):
    def decorator(cls: type[MediaEncoder]) -> type[MediaEncoder]:
        if name in ENCODER_REGISTRY and ENCODER_REGISTRY[name] is not cls:
            raise ValueError(f"encoder type {name!r} is already registered to {ENCODER_REGISTRY[name]}")
        ENCODER_REGISTRY[name] = cls
        return cls

    return decorator


def _encoder_class(cfg) -> type[MediaEncoder]:
    try:
        cls = ENCODER_REGISTRY[cfg.type]
    except KeyError:
        known = ", ".join(sorted(ENCODER_REGISTRY))
        raise ValueError(f"unknown encoder type {cfg.type!r}; registered: {known}") from None
    if getattr(cfg, "max_seconds", None) is not None and cls.preprocessor_class.chunk_seconds is None:
        raise ConfigError(f"encoder type {cfg.type!r} takes no max_seconds (it is the chunked-speech option of "
                          f"Whisper); cut audio with num_windows / window_seconds instead")
    return cls


def build_encoder(cfg) -> MediaEncoder:
    """Build and freeze the encoder that ``cfg.type`` names."""
    return _encoder_class(cfg).from_config(cfg).freeze()


def build_preprocessor(cfg) -> MediaPreprocessor:
    """The preprocessing half of the encoder ``cfg.type`` names, from its config alone (no weights
    are loaded): what the media processor needs to prepare items and count their tokens."""
    return _encoder_class(cfg).preprocessor_class.from_config(cfg)


# Registration happens on import of each encoder module.
from mllm.encoders import beats, clip, whisper  # noqa: E402,F401

__all__ = ["ENCODER_REGISTRY", "MediaEncoder", "MediaPreprocessor", "build_encoder", "build_preprocessor",
           "register_encoder"]
