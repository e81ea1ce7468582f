"""Tuners inside the LLM, one registry: ``tuner.type`` in the config -> a peft config builder.

peft's LoRA and DoRA are here as they are; MokA (``moka``), MoRA (``mora``) and DeLo register
their own peft methods (``mllm.tuners.registration``) and add an entry.
"""

from __future__ import annotations

from typing import Any, Callable

from peft import LoraConfig, PeftConfig, get_peft_model
from torch import nn

# (TunerConfig) -> PeftConfig; mllm.config.TunerConfig is not imported to keep this module light.
TunerBuilder = Callable[[Any], PeftConfig]
TUNER_REGISTRY: dict[str, TunerBuilder] = {}


def register_tuner(name: str):
    def decorator(fn: TunerBuilder) -> TunerBuilder:
        TUNER_REGISTRY[name] = fn
        return fn

    return decorator


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


@register_tuner("lora")
def lora_config(cfg) -> LoraConfig:
    """peft LoRA; tuner.options: any other LoraConfig field (e.g. use_rslora)."""
    return _lora_config(cfg, use_dora=False)


@register_tuner("dora")
def dora_config(cfg) -> LoraConfig:
    """peft DoRA (LoRA with use_dora); tuner.options: any other LoraConfig field."""
    return _lora_config(cfg, use_dora=True)


@register_tuner("moka")
def moka_config(cfg):
    """MokA; tuner.options: modalities, modality_ranks, strengths, cross_attention, variant, num_loras.

    ``mllm.tuners.moka``; ``options`` holds the method's own fields."""
    from mllm.tuners.moka import MokaConfig

    return MokaConfig(
        r=cfg.r,
        alpha=cfg.alpha,
        dropout=cfg.dropout,
        target_modules=cfg.target_modules,   # None: the family's attention + MLP projections
        task_type="CAUSAL_LM",
        **cfg.options,
    )


@register_tuner("mora")
def mora_config(cfg):
    """MoRA; tuner.options: pair_encoder (stage 2), num_paired_layers, shared_r, alpha (eta), inner_pairs.

    ``mllm.tuners.mora``, for a two-tower model (vision and text layer lists); in stage 2
    ``MultimodalLM.apply_tuner`` pairs ``options.pair_encoder``'s layers with the LLM's. ``alpha``
    in ``options`` is the low-rank strength eta (LoRA's ``tuner.alpha`` means something else and is
    not passed on); ``layer_pairs``, ``vision_layers``, ``text_layers`` set the pairing by hand."""
    from mllm.tuners.mora import MoraConfig

    fields = {"r": cfg.r, "dropout": cfg.dropout, **cfg.options}
    if cfg.target_modules is not None:
        fields["target_modules"] = cfg.target_modules
    return MoraConfig(**fields)


@register_tuner("delo")
def delo_config(cfg):
    """DeLo; tuner.options: num_experts, num_tasks, query_dim; task sequences: tuner.task, tuner.continue_from.

    ``mllm.tuners.delo``: ``tuner.r`` is the number of rank-one factors selected per sample and
    modality. Inside an LLM the caller (or a ``MultimodalLM``'s modality context) supplies
    per-token modality ids; see ``DeloModel``."""
    from mllm.tuners.delo import DeloConfig

    fields = {"r": cfg.r, "alpha": cfg.alpha, "dropout": cfg.dropout, **cfg.options}
    if cfg.target_modules is not None:
        fields["target_modules"] = cfg.target_modules
    return DeloConfig(**fields)


def tuner_summaries() -> dict[str, str]:
    """``tuner.type`` -> one line for ``--help`` (the first line of the builder's docstring)."""
    return {"none": "projectors only", **{name: (builder.__doc__ or "").strip().splitlines()[0]
                                          for name, builder in sorted(TUNER_REGISTRY.items())}}


def build_peft_config(cfg) -> PeftConfig | None:
    if cfg.type in (None, "none"):
        return None
    try:
        builder = TUNER_REGISTRY[cfg.type]
    except KeyError:
        known = ", ".join(["none", *sorted(TUNER_REGISTRY)])
        raise ValueError(f"unknown tuner type {cfg.type!r}; available: {known}") from None
    return builder(cfg)


def apply_tuner(llm: nn.Module, cfg) -> nn.Module:
    """Wrap the LLM with the configured peft tuner (or return it unchanged for ``none``)."""
    peft_config = build_peft_config(cfg)
    if peft_config is None:
        return llm
    return get_peft_model(llm, peft_config)
