"""Tuners inside the LLM, one registry: ``tuner.type`` in the config -> a peft config builder and
the peft config class, whose class attributes say what the rest of the project may do with it:

* ``pairs_with_encoder``: stage 2 pairs ``options.pair_encoder``'s layers with the LLM's (MoRA);
* ``mergeable``: ``merge_and_unload`` folds the adapter into the weights (False: ``merge_refusal``
  says why, e.g. MokA's routed A matrices);
* ``merges_into_4bit``: it merges into a 4-bit LLM once that is dequantized.

peft's LoRA and DoRA are registered here; every other tuner is a package of its own (config,
layer, model, as peft's are) whose ``__init__`` registers its peft method and its entry, so adding a
tuner is adding its package and one import line at the end of this file.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from peft import LoraConfig, PeftConfig, get_peft_model
from torch import nn

from mllm.errors import ConfigError

# (TunerConfig) -> PeftConfig; mllm.config.TunerConfig is not imported (tuners know no config schema).
TunerBuilder = Callable[[Any], PeftConfig]


@dataclass(frozen=True)
class TunerEntry:
    build: TunerBuilder
    config_class: type


TUNER_REGISTRY: dict[str, TunerEntry] = {}
#: Capabilities a peft config class has unless it says otherwise (LoRA / DoRA have them all but pairing).
CAPABILITY_DEFAULTS = {"pairs_with_encoder": False, "mergeable": True, "merges_into_4bit": True}


def register_tuner(name: str, config_class: type):
    def decorator(fn: TunerBuilder) -> TunerBuilder:
        TUNER_REGISTRY[name] = TunerEntry(fn, config_class)
        return fn

    return decorator


def tuner_capability(tuner_type: str, capability: str) -> bool:
    """``capability`` (a key of ``CAPABILITY_DEFAULTS``) of the tuner registered as ``tuner_type``."""
    return getattr(_entry(tuner_type).config_class, capability, CAPABILITY_DEFAULTS[capability])


def merge_refusal(tuner_type: str) -> str:
    """Why the tuner cannot be merged (empty when it can)."""
    if tuner_capability(tuner_type, "mergeable"):
        return ""
    return getattr(_entry(tuner_type).config_class, "merge_refusal", f"{tuner_type} adapters do not merge")


def tuner_config_class(tuner_type: str) -> type:
    """The peft config class of the tuner registered as ``tuner_type``."""
    return _entry(tuner_type).config_class


def _entry(tuner_type: str) -> TunerEntry:
    try:
        return TUNER_REGISTRY[tuner_type]
    except KeyError:
        known = ", ".join(["none", *sorted(TUNER_REGISTRY)])
        raise ConfigError(f"tuner.type: unknown tuner type {tuner_type!r}; available: {known}") from None


def _lora_config(cfg, use_dora: bool) -> LoraConfig:
    return LoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        # peft's "all-linear": every nn.Linear of the LLM except the output layer.
        target_modules=cfg.target_modules or "all-linear",
        use_dora=use_dora,
        task_type="CAUSAL_LM",
        **cfg.options,
    )


@register_tuner("lora", LoraConfig)
def lora_config(cfg) -> LoraConfig:
    """peft LoRA; tuner.options: any other LoraConfig field (e.g. use_rslora)."""
    return _lora_config(cfg, use_dora=False)


@register_tuner("dora", LoraConfig)
def dora_config(cfg) -> LoraConfig:
    """peft DoRA (LoRA with use_dora); tuner.options: any other LoraConfig field."""
    return _lora_config(cfg, use_dora=True)


def tuner_summaries() -> dict[str, str]:
    """``tuner.type`` -> one line for ``--help`` (the first line of the builder's docstring)."""
    return {"none": "projectors only", **{name: (entry.build.__doc__ or "").strip().splitlines()[0]
                                          for name, entry in sorted(TUNER_REGISTRY.items())}}


def build_peft_config(cfg) -> PeftConfig | None:
    if cfg.type in (None, "none"):
        return None
    return _entry(cfg.type).build(cfg)


def apply_tuner(llm: nn.Module, cfg) -> nn.Module:
    """Wrap the LLM with the configured peft tuner (or return it unchanged for ``none``)."""
    peft_config = build_peft_config(cfg)
    if peft_config is None:
        return llm
    return get_peft_model(llm, peft_config)


# Each tuner package registers its peft method and its entry on import (last: they use the above).
from mllm.tuners import delo, moka, mora  # noqa: E402,F401
