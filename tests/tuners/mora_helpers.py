"""Tiny random CLIP dual encoders for MoRA tests (vision width 48 / 3 layers, text width 32 / 2 layers)."""

from __future__ import annotations

import torch


def tiny_clip_config(vision_layers=3, text_layers=2):
    from transformers import CLIPConfig

    text = dict(vocab_size=99, hidden_size=32, intermediate_size=37, num_hidden_layers=text_layers,
                num_attention_heads=4, max_position_embeddings=16, bos_token_id=0, eos_token_id=2, pad_token_id=1)
    vision = dict(hidden_size=48, intermediate_size=37, num_hidden_layers=vision_layers, num_attention_heads=4,
                  image_size=16, patch_size=8)
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=24)


def tiny_clip(seed=0, dtype=torch.float32, **kw):
    from transformers import CLIPModel

    torch.manual_seed(seed)
    return CLIPModel(tiny_clip_config(**kw)).to(dtype).eval()


def clip_inputs(seed=1, batch=3):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 99, (batch, 7), generator=g)
    ids[:, -1] = 2
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids),
            "pixel_values": torch.randn(batch, 3, 16, 16, generator=g)}


def clip_outputs(model, inputs):
    """Image and text embeddings (both towers) as one tensor."""
    with torch.no_grad():
        out = model(**inputs)
    return torch.cat([out.image_embeds, out.text_embeds], dim=-1)
