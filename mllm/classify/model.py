"""CLIP with a classification head over the concatenated image and text embeddings (the MoRA /
DCP setup), and the tuners the paper compares (table 4): MoRA, LoRA, DoRA, BitFit, full
fine-tuning, frozen backbone (head only)."""

from __future__ import annotations

import re

import torch
from torch import nn

TUNERS = ("mora", "lora", "dora", "bitfit", "full", "frozen")


class MissingModalityClassifier(nn.Module):
    """logits = head([visual_projection(vision pooled); text_projection(text pooled)])."""

    def __init__(self, clip: nn.Module, num_classes: int):
        super().__init__()
        self.clip = clip          # a transformers CLIPModel, or a PeftModel wrapping one
        dim = self.backbone.config.projection_dim
        self.head = nn.Linear(2 * dim, num_classes)

    @property
    def backbone(self) -> nn.Module:
        clip = self.clip
        return clip.get_base_model() if hasattr(clip, "get_base_model") else clip

    def forward(self, input_ids, attention_mask, pixel_values) -> torch.Tensor:
        clip = self.backbone   # adapters are injected in place, so the base model's towers carry them
        image = clip.visual_projection(clip.vision_model(pixel_values=pixel_values).pooler_output)
        text = clip.text_projection(clip.text_model(input_ids=input_ids, attention_mask=attention_mask).pooler_output)
        return self.head(torch.cat([image, text], dim=-1))


def _paired_layer_regex(clip: nn.Module, options: dict) -> str:
    """LoRA / DoRA on the same projections of the same layers MoRA adapts (fair comparison)."""
    k = options.get("num_paired_layers", 2)
    targets = options.get("target_modules", ["q_proj", "v_proj"])
    depth_v = clip.config.vision_config.num_hidden_layers
    depth_t = clip.config.text_config.num_hidden_layers
    vision = "|".join(str(i) for i in range(depth_v - k, depth_v))
    text = "|".join(str(i) for i in range(depth_t - k, depth_t))
    proj = "|".join(re.escape(t) for t in targets)
    return (rf".*(vision_model\.encoder\.layers\.({vision})|text_model\.encoder\.layers\.({text}))"
            rf"\.self_attn\.({proj})")


def apply_tuner(clip: nn.Module, kind: str, options: dict | None = None) -> nn.Module:
    """Return the backbone prepared for ``kind``; only the tuner's parameters require grad."""
    options = dict(options or {})
    if kind not in TUNERS:
        raise ValueError(f"unknown tuner {kind!r}; expected one of {TUNERS}")
    if kind == "mora":
        from peft import get_peft_model

        from mllm.tuners.mora import MoraConfig

        return get_peft_model(clip, MoraConfig(**options))
    if kind in ("lora", "dora"):
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(r=options.get("r", 4), lora_alpha=options.get("lora_alpha", 8),
                            lora_dropout=options.get("dropout", 0.1), use_dora=kind == "dora",
                            target_modules=_paired_layer_regex(clip, options))
        return get_peft_model(clip, config)
    for name, param in clip.named_parameters():
        param.requires_grad_(kind == "full" or (kind == "bitfit" and name.endswith(".bias")))
    return clip
