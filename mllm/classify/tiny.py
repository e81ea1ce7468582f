"""A tiny random CLIP dual encoder built from a config and saved locally (demo, benchmark; no
downloads). As in the paper's CLIP ViT-B/16 the two towers have different widths, so MoRA's
shared factors S^v and S^t have different shapes."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class TinyClipSizes:
    vision_width: int = 64
    text_width: int = 48
    vision_layers: int = 3
    text_layers: int = 3
    heads: int = 4
    image_size: int = 32
    patch_size: int = 8
    projection_dim: int = 32
    max_positions: int = 32


def tiny_clip_config(vocab_size: int, eos_token_id: int, pad_token_id: int = 0,
                     sizes: TinyClipSizes = TinyClipSizes()):
    from transformers import CLIPConfig

    text = dict(vocab_size=vocab_size, hidden_size=sizes.text_width, intermediate_size=2 * sizes.text_width,
                num_hidden_layers=sizes.text_layers, num_attention_heads=sizes.heads,
                max_position_embeddings=sizes.max_positions, bos_token_id=pad_token_id, eos_token_id=eos_token_id,
                pad_token_id=pad_token_id)
    vision = dict(hidden_size=sizes.vision_width, intermediate_size=2 * sizes.vision_width,
                  num_hidden_layers=sizes.vision_layers, num_attention_heads=sizes.heads,
                  image_size=sizes.image_size, patch_size=sizes.patch_size)
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=sizes.projection_dim)


def tiny_clip(vocab_size: int, eos_token_id: int, pad_token_id: int = 0, sizes: TinyClipSizes = TinyClipSizes(),
              seed: int = 0):
    from transformers import CLIPModel

    torch.manual_seed(seed)
    return CLIPModel(tiny_clip_config(vocab_size, eos_token_id, pad_token_id, sizes)).eval()


def build_tiny_clip(path: str, tokenizer_path: str, sizes: TinyClipSizes = TinyClipSizes(), seed: int = 0) -> str:
    """Save a random tiny CLIPModel sized to the tokenizer at ``tokenizer_path``, with that
    tokenizer, in ``path`` (a folder ``from_pretrained`` loads as model and tokenizer)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
    model = tiny_clip(len(tokenizer), tokenizer.eos_token_id, tokenizer.pad_token_id, sizes, seed)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
