"""peft's LoRA and DoRA (DoRA: LoRA with ``use_dora``), registered for every backbone kind.

* the MLLM's LLM: ``tuner.r`` / ``alpha`` / ``dropout`` / ``target_modules``, any other LoraConfig
  field in ``tuner.options``;
* CLIP (``mllm classify``): the same projections of the same layers MoRA adapts (the last
  ``num_paired_layers`` of each tower, ``target_modules`` q and v by default), for a fair comparison;
* ViLT (``mllm cmml``): the sequential fine-tuning baseline of DeLo, on the projections DeLo adapts.
"""

from __future__ import annotations

import re

from peft import LoraConfig, get_peft_model
from torch import nn

from mllm.errors import ConfigError
from mllm.tuners import CLIP, VILT, register_tuner


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


# -- CLIP: the layers MoRA pairs ---------------------------------------------------------------------------
def _paired_layer_regex(clip: nn.Module, options: dict) -> str:
    k = options.get("num_paired_layers", 2)
    targets = options.get("target_modules", ["q_proj", "v_proj"])
    depth_v = clip.config.vision_config.num_hidden_layers
    depth_t = clip.config.text_config.num_hidden_layers
    vision = "|".join(str(i) for i in range(depth_v - k, depth_v))
    text = "|".join(str(i) for i in range(depth_t - k, depth_t))
    proj = "|".join(re.escape(t) for t in targets)
    return (rf".*(vision_model\.encoder\.layers\.({vision})|text_model\.encoder\.layers\.({text}))"
            rf"\.self_attn\.({proj})")


def _lora_on_clip(clip: nn.Module, options: dict, use_dora: bool) -> nn.Module:
    config = LoraConfig(r=options.get("r", 4), lora_alpha=options.get("lora_alpha", 8),
                        lora_dropout=options.get("dropout", 0.1), use_dora=use_dora,
                        target_modules=_paired_layer_regex(clip, options))
    return get_peft_model(clip, config)


@register_tuner("lora", LoraConfig, backbone=CLIP)
def lora_on_clip(clip: nn.Module, options: dict) -> nn.Module:
    """LoRA; options: r, lora_alpha, dropout, num_paired_layers, target_modules."""
    return _lora_on_clip(clip, options, use_dora=False)


@register_tuner("dora", LoraConfig, backbone=CLIP)
def dora_on_clip(clip: nn.Module, options: dict) -> nn.Module:
    """DoRA; options as LoRA's."""
    return _lora_on_clip(clip, options, use_dora=True)


# -- ViLT: DeLo's sequential fine-tuning baseline -----------------------------------------------------------
@register_tuner("lora", LoraConfig, backbone=VILT)
def lora_on_vilt(vilt: nn.Module, options: dict) -> nn.Module:
    """One LoRA adapter of rank ``r`` and scaling ``alpha / r`` (DeLo's rule) on DeLo's projections
    (ViLT's query / key / value unless ``target_modules``); options: r, alpha, dropout, target_modules.
    ``num_experts`` is DeLo's (the CMML presets share the tuner section) and is ignored here."""
    from mllm.tuners.delo.config import TARGET_MODULES_BY_MODEL_TYPE

    options = {k: v for k, v in options.items() if k != "num_experts"}
    r, alpha = options.pop("r"), options.pop("alpha")
    targets = options.pop("target_modules", None) or \
        TARGET_MODULES_BY_MODEL_TYPE.get(vilt.config.model_type, "all-linear")
    dropout = options.pop("dropout", 0.0)
    if options:
        raise ConfigError(f"tuner: field(s) {sorted(options)} are not used by the lora baseline "
                          f"(it takes r, alpha, dropout, target_modules)")
    return get_peft_model(vilt, LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout,
                                           target_modules=targets if isinstance(targets, str) else list(targets)))
