"""CLIP vision tower (ViT-L/14 by default) for images and video frames.

Features are LLaVA-style: the hidden states of ``select_layer`` (penultimate by default, which
has no post-LayerNorm) with the CLS token dropped. ``from_pretrained`` accepts both
``CLIPVisionModel`` and full ``CLIPModel`` checkpoints (the text tower is ignored).
"""

from __future__ import annotations

import torch
from transformers import CLIPImageProcessorPil, CLIPVisionConfig, CLIPVisionModel

from mllm.encoders import register_encoder
from mllm.encoders.base import MediaEncoder, MediaPreprocessor
from mllm.modality import Modality


def _image_processor(path: str) -> CLIPImageProcessorPil:
    # The PIL backend, explicitly: with torchvision importable, CLIPImageProcessor switches to
    # its torchvision backend, whose resize differs (up to 0.015 per pixel value).
    return CLIPImageProcessorPil.from_pretrained(path)


class CLIPPreprocessor(MediaPreprocessor):
    """CLIP's resize, crop and normalisation; one row per patch (plus CLS unless dropped)."""

    def __init__(self, image_processor: CLIPImageProcessorPil, vision_config: CLIPVisionConfig, drop_cls: bool = True):
        self.image_processor = image_processor
        self.num_patches = (vision_config.image_size // vision_config.patch_size) ** 2
        self.drop_cls = drop_cls

    @classmethod
    def from_config(cls, cfg) -> "CLIPPreprocessor":
        """From the tower's ``config.json`` and ``preprocessor_config.json`` (no weights)."""
        return cls(_image_processor(cfg.path), CLIPVisionConfig.from_pretrained(cfg.path), drop_cls=cfg.drop_cls)

    def output_length(self, num_samples: int | None = None) -> int:
        return self.num_patches + (0 if self.drop_cls else 1)

    def preprocess(self, items) -> torch.Tensor:
        """PIL images -> pixel values (N, 3, H, W)."""
        return self.image_processor(images=list(items), return_tensors="pt")["pixel_values"]


@register_encoder("clip")
class CLIPVisualEncoder(MediaEncoder):
    modality = Modality.VISUAL
    layers_path = "vision_model.encoder.layers"
    preprocessor_class = CLIPPreprocessor

    def __init__(self, vision_model: CLIPVisionModel, processor: CLIPImageProcessorPil,
                 select_layer: int = -2, drop_cls: bool = True):
        super().__init__()
        self.vision_model = vision_model
        self.processor = processor
        self.preprocessor = CLIPPreprocessor(processor, vision_model.config, drop_cls)
        self.select_layer = select_layer
        self.drop_cls = drop_cls
        self.hidden_size = vision_model.config.hidden_size
        num_layers = vision_model.config.num_hidden_layers
        # hidden_states has num_layers + 1 entries (embeddings first).
        if not -(num_layers + 1) <= select_layer <= num_layers:
            raise ValueError(f"select_layer={select_layer} is out of range for a CLIP tower "
                             f"with {num_layers} layers")

    @classmethod
    def from_config(cls, cfg) -> "CLIPVisualEncoder":
        dtype = getattr(torch, cfg.dtype) if cfg.dtype else torch.float32
        model = CLIPVisionModel.from_pretrained(cfg.path, dtype=dtype)
        processor = _image_processor(cfg.path)
        select_layer = -2 if cfg.select_layer is None else cfg.select_layer  # LLaVA default
        return cls(model, processor, select_layer=select_layer, drop_cls=cfg.drop_cls)

    @property
    def num_patches(self) -> int:
        return self.preprocessor.num_patches

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        param = next(self.vision_model.parameters())
        out = self.vision_model(pixel_values=pixel_values.to(param.device, param.dtype),
                                output_hidden_states=True)
        features = out.hidden_states[self.select_layer]
        return features[:, 1:] if self.drop_cls else features
