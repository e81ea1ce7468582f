"""CLIP with a classification head over the concatenated image and text embeddings (the MoRA /
DCP setup), prepared for any tuner the registry has for CLIP (``mllm.tuners.tuner_names(CLIP)``:
the paper's table 4 compares MoRA, LoRA, DoRA, BitFit, full fine-tuning, frozen backbone)."""

from __future__ import annotations

import torch
from torch import nn


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


def prepare_clip_for_tuner(clip: nn.Module, tuner_type: str, options: dict | None = None) -> nn.Module:
    """``clip`` made ready to train with the tuner registered for CLIP as ``tuner_type`` (peft-wrapped, or
    its own parameters marked): only the tuner's parameters require grad. An unknown name, or a
    tuner that adapts other backbones only, is a ConfigError listing ``tuner_names(CLIP)``."""
    from mllm.tuners import CLIP, tuner_builder

    return tuner_builder(tuner_type, CLIP)(clip, dict(options or {}))
