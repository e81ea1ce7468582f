"""The CLIP visual encoder: layer selection, CLS dropping and the registry."""

from __future__ import annotations

import pytest
import torch
from PIL import Image
from transformers import CLIPVisionModel

from mllm.config import EncoderConfig
from mllm.encoders import ENCODER_REGISTRY, build_encoder, register_encoder


def test_penultimate_layer_without_cls(tiny_assets):
    encoder = build_encoder(EncoderConfig(type="clip", path=tiny_assets["clip"]))
    reference = CLIPVisionModel.from_pretrained(tiny_assets["clip"]).eval()
    pixels = encoder.preprocess([Image.new("RGB", (40, 30), (200, 10, 10))])
    assert pixels.shape == (1, 3, 32, 32)  # resized and centre-cropped by the CLIP processor
    features = encoder(pixels)
    hidden = reference(pixel_values=pixels, output_hidden_states=True).hidden_states
    assert features.shape == (1, encoder.num_patches, encoder.hidden_size)
    assert torch.allclose(features, hidden[-2][:, 1:])


def test_layer_and_cls_are_configurable(tiny_assets):
    encoder = build_encoder(EncoderConfig(type="clip", path=tiny_assets["clip"], select_layer=-1, drop_cls=False))
    reference = CLIPVisionModel.from_pretrained(tiny_assets["clip"]).eval()
    pixels = torch.randn(2, 3, 32, 32)
    assert torch.allclose(encoder(pixels), reference(pixel_values=pixels).last_hidden_state)


def test_encoder_is_frozen_and_stays_in_eval_mode(tiny_assets):
    encoder = build_encoder(EncoderConfig(type="clip", path=tiny_assets["clip"]))
    encoder.train()
    assert not encoder.training and not any(p.requires_grad for p in encoder.parameters())


def test_registry_errors():
    with pytest.raises(ValueError, match="unknown encoder type 'nope'; registered: beats, clip, whisper"):
        build_encoder(EncoderConfig(type="nope"))
    with pytest.raises(ValueError, match="already registered"):
        register_encoder("clip")(type("Other", (), {}))
    assert "clip" in ENCODER_REGISTRY
