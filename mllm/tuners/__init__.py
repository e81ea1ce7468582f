"""The one tuner registry. Each entry is a tuner name (``tuner.type``), its peft config class and one
builder per backbone kind it can adapt; every stage asks the registry for the entries of its
backbone (``tuner_names``, ``tuner_builder``) and keeps no tuner list of its own:

* ``CAUSAL_LM``: the MLLM's LLM (stages 1 and 2); builder ``(TunerConfig) -> PeftConfig``;
* ``CLIP``: a CLIP dual encoder (``mllm classify``); builder ``(clip, options) -> clip`` prepared so
  that only the tuner's parameters require grad;
* ``VILT``: a ViLT encoder (``mllm cmml``); builder ``(vilt, options) -> PeftModel`` (the stage puts
  ``num_tasks`` in ``options`` for a tuner whose config ``partitions_tasks``).

The peft config class's attributes say what the rest of the project may do with a tuner:

* ``pairs_with_encoder``: stage 2 pairs ``options.pair_encoder``'s layers with the LLM's (MoRA);
* ``mergeable``: ``merge_and_unload`` folds the adapter into the weights (False: ``merge_refusal``
  says why, e.g. MokA's routed A matrices);
* ``merges_into_4bit``: it merges into a 4-bit LLM once that is dequantized;
* ``partitions_tasks``: one part of the adapter per task of a continual sequence (DeLo);
* ``per_sample_decode_state``: the prompt pass leaves state per sample that the KV-cache decode steps
  read (DeLo's routing), so a batch's rows must stay the same until generation ends (``mllm serve``
  then runs ``generate`` batches instead of continuous batching).

peft's LoRA and DoRA live in ``lora.py``, the baselines that add no adapter (BitFit, full
fine-tuning, frozen backbone) in ``baselines.py``; every other tuner is a package of its own (config,
layer, model, as peft's are) whose ``__init__`` registers its peft method and its builders, so adding
a tuner is adding its package and one import line at the end of this file.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from peft import PeftConfig, get_peft_model
from torch import nn

from mllm.errors import ConfigError

# Backbone kinds a tuner may adapt -> how an error names them.
CAUSAL_LM = "causal_lm"
CLIP = "clip"
VILT = "vilt"
BACKBONES = {CAUSAL_LM: "the MLLM's causal LM", CLIP: "a CLIP dual encoder (mllm classify)",
             VILT: "a ViLT encoder (mllm cmml)"}

# (TunerConfig) -> PeftConfig; mllm.config.TunerConfig is not imported (tuners know no config schema).
TunerBuilder = Callable[[Any], PeftConfig]


@dataclass
class TunerEntry:
    config_class: type | None                  # None: a baseline that adds no adapter (bitfit, full, frozen)
    builders: dict[str, Callable] = field(default_factory=dict)   # backbone kind -> builder


TUNER_REGISTRY: dict[str, TunerEntry] = {}
#: Capabilities a config class has unless it says otherwise (LoRA / DoRA have them all but pairing).
CAPABILITY_DEFAULTS = {"pairs_with_encoder": False, "mergeable": True, "merges_into_4bit": True,
                       "partitions_tasks": False, "per_sample_decode_state": False}


def register_tuner(name: str, config_class: type | None, backbone: str = CAUSAL_LM):
    """Decorator: the builder of tuner ``name`` for ``backbone`` (one of ``BACKBONES``)."""
    if backbone not in BACKBONES:
        raise ValueError(f"unknown backbone kind {backbone!r}; expected one of {sorted(BACKBONES)}")

    def decorator(fn: Callable) -> Callable:
        entry = TUNER_REGISTRY.setdefault(name, TunerEntry(config_class))
        if entry.config_class is not config_class:
            raise ValueError(f"tuner {name!r} is registered with {entry.config_class}, not {config_class}")
        entry.builders[backbone] = fn
        return fn

    return decorator


def tuner_names(backbone: str) -> list[str]:
    """The tuners registered for ``backbone``, sorted."""
    return sorted(name for name, entry in TUNER_REGISTRY.items() if backbone in entry.builders)


def tuner_builder(tuner_type: str, backbone: str) -> Callable:
    """The builder of ``tuner_type`` for ``backbone``; a ConfigError listing that backbone's tuners
    when the name is unknown or adapts other backbones only."""
    entry = TUNER_REGISTRY.get(tuner_type)
    if entry is not None and backbone in entry.builders:
        return entry.builders[backbone]
    known = ", ".join(_available(backbone))
    if entry is None:
        raise ConfigError(f"tuner.type: unknown tuner type {tuner_type!r}; available for {BACKBONES[backbone]}: "
                          f"{known}")
    raise ConfigError(f"tuner.type: {tuner_type!r} does not adapt {BACKBONES[backbone]}, only "
                      f"{' and '.join(BACKBONES[b] for b in entry.builders)}; available: {known}")


def tuner_capability(tuner_type: str, capability: str) -> bool:
    """``capability`` (a key of ``CAPABILITY_DEFAULTS``) of the tuner registered as ``tuner_type``."""
    return config_capability(_entry(tuner_type).config_class, capability)


def config_capability(config: PeftConfig | type | None, capability: str) -> bool:
    """``capability`` of a peft config (instance or class), e.g. of an adapter loaded from disk."""
    config_class = config if isinstance(config, type) or config is None else type(config)
    return getattr(config_class, capability, CAPABILITY_DEFAULTS[capability])


def merge_refusal(tuner_type: str) -> str:
    """Why the tuner cannot be merged (empty when it can)."""
    if tuner_capability(tuner_type, "mergeable"):
        return ""
    return getattr(_entry(tuner_type).config_class, "merge_refusal", f"{tuner_type} adapters do not merge")


def tuner_config_class(tuner_type: str, backbone: str = CAUSAL_LM) -> type | None:
    """The peft config class of the tuner registered as ``tuner_type`` for ``backbone`` (a ConfigError
    listing the valid names when it adapts other backbones only)."""
    tuner_builder(tuner_type, backbone)
    return _entry(tuner_type).config_class


def _entry(tuner_type: str) -> TunerEntry:
    try:
        return TUNER_REGISTRY[tuner_type]
    except KeyError:
        known = "; ".join(f"for {what}: {', '.join(_available(backbone))}" for backbone, what in BACKBONES.items())
        raise ConfigError(f"tuner.type: unknown tuner type {tuner_type!r}; available {known}") from None


def _available(backbone: str) -> list[str]:
    """What ``tuner.type`` may be for ``backbone`` (the MLLM's LLM may also have no tuner)."""
    return (["none"] if backbone == CAUSAL_LM else []) + tuner_names(backbone)


def tuner_summaries() -> dict[str, str]:
    """``tuner.type`` -> one line for ``--help`` (the first line of the LLM builder's docstring)."""
    return {"none": "projectors only",
            **{name: (TUNER_REGISTRY[name].builders[CAUSAL_LM].__doc__ or "").strip().splitlines()[0]
               for name in tuner_names(CAUSAL_LM)}}


def build_peft_config(cfg) -> PeftConfig | None:
    if cfg.type in (None, "none"):
        return None
    return tuner_builder(cfg.type, CAUSAL_LM)(cfg)


def apply_tuner(llm: nn.Module, cfg) -> nn.Module:
    """Wrap the LLM with the configured peft tuner (or return it unchanged for ``none``)."""
    peft_config = build_peft_config(cfg)
    if peft_config is None:
        return llm
    return get_peft_model(llm, peft_config)


# Each tuner module / package registers its builders (and its peft method) on import (last: they use the above).
from mllm.tuners import baselines, delo, lora, moka, mora  # noqa: E402,F401
