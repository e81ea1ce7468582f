"""Tiny random ViLT backbones and inputs for the DeLo tests (no downloads)."""

from __future__ import annotations

import torch


def tiny_vilt(seed: int = 0):
    from transformers import ViltConfig, ViltModel

    torch.manual_seed(seed)
    config = ViltConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=24, image_size=16, patch_size=8, num_channels=3,
                        max_position_embeddings=16, modality_type_vocab_size=2, max_image_length=-1)
    model = ViltModel(config).eval()
    # ViLT shuffles the image patches with torch.multinomial on every forward. DeLo's queries are
    # means over tokens (order-free), but comparing outputs needs one fixed order: pin it.
    visual_embed = model.embeddings.visual_embed

    def fixed_order(*args, **kwargs):
        with torch.random.fork_rng():
            torch.manual_seed(0)
            return visual_embed(*args, **kwargs)

    model.embeddings.visual_embed = fixed_order
    return model


def vilt_inputs(batch: int = 3, text_len: int = 5, seed: int = 1, shift: float = 0.0, token_offset: int = 0,
                vocab_width: int = 15):
    """Random inputs; ``shift`` / ``token_offset`` move a task's images / texts apart (separable tasks)."""
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(token_offset + 1, token_offset + 1 + vocab_width, (batch, text_len), generator=g)
    return {"input_ids": input_ids, "attention_mask": torch.ones(batch, text_len, dtype=torch.long),
            "pixel_values": torch.randn(batch, 3, 16, 16, generator=g) + shift,
            "pixel_mask": torch.ones(batch, 16, 16, dtype=torch.long)}


def delo_vilt(num_tasks: int = 2, init_weights: bool = False, seed: int = 0, **kwargs):
    from peft import get_peft_model

    from mllm.continual.vilt_ids import publish_vilt_modality_ids
    from mllm.tuners.delo import DeloConfig

    config = DeloConfig(r=2, num_experts=4, num_tasks=num_tasks, init_weights=init_weights, **kwargs)
    torch.manual_seed(seed + 100)
    model = get_peft_model(tiny_vilt(seed), config)
    publish_vilt_modality_ids(model)
    return model
