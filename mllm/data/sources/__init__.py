"""Native dataset readers behind one registry: ``type`` name in ``data.train`` -> source class.

Each module reads one dataset in its released layout and yields LLaVA-style records (see
``mllm.data.sources.base``); ``mllm data convert --from TYPE SRC OUT.jsonl`` writes them out, and
``data.train`` / ``data.eval`` may name sources instead of a LLaVA file (``mllm.data.mixture``).
New sources plug in with ``@register_source`` and need no other change.
"""

from __future__ import annotations

import inspect

from mllm.data.sources.base import Located, Source

SOURCE_REGISTRY: dict[str, type[Source]] = {}


def register_source(cls: type[Source]) -> type[Source]:
    if cls.name in SOURCE_REGISTRY and SOURCE_REGISTRY[cls.name] is not cls:
        raise ValueError(f"data source type {cls.name!r} is already registered to {SOURCE_REGISTRY[cls.name]}")
    SOURCE_REGISTRY[cls.name] = cls
    return cls


def source_options(name: str) -> dict[str, object]:
    """The options source ``name`` takes (its constructor's keyword arguments) and their defaults."""
    init = SOURCE_REGISTRY[name].__init__
    if init is object.__init__:
        return {}
    return {p.name: p.default for p in inspect.signature(init).parameters.values() if p.name != "self"}


def get_source(name: str, **options) -> Source:
    """Build source ``name``; an unknown type or option is a ValueError that lists the valid ones."""
    if name not in SOURCE_REGISTRY:
        raise ValueError(f"unknown data source type {name!r}; registered: {', '.join(sorted(SOURCE_REGISTRY))}")
    valid = source_options(name)
    unknown = [k for k in options if k not in valid]
    if unknown:
        listed = ", ".join(f"{k} (default {v!r})" for k, v in valid.items()) or "none"
        raise ValueError(f"data source {name!r} has no option {', '.join(map(repr, unknown))}; valid options: {listed}")
    return SOURCE_REGISTRY[name](**options)


def source_summaries() -> dict[str, str]:
    return {name: cls.summary for name, cls in sorted(SOURCE_REGISTRY.items())}


# Registration happens on import of each source module.
from mllm.data.sources import audiocaps, clotho, librispeech, llava, moka, wavcaps  # noqa: E402,F401

__all__ = ["SOURCE_REGISTRY", "Located", "Source", "get_source", "register_source", "source_options",
           "source_summaries"]
