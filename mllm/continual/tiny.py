"""A tiny random ViLT (transformers ``ViltModel``) and its ``ViltProcessor`` over a given word list,
built from a config and saved locally (demo, benchmark, tests; no downloads)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Sequence

import torch

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


@dataclass
class TinyViltSizes:
    hidden: int = 64
    layers: int = 2
    heads: int = 4
    image_size: int = 32
    patch_size: int = 8
    max_positions: int = 16
    initializer_range: float = 0.02


def tiny_vilt_config(vocab_size: int, sizes: TinyViltSizes = TinyViltSizes()):
    from transformers import ViltConfig

    return ViltConfig(vocab_size=vocab_size, hidden_size=sizes.hidden, num_hidden_layers=sizes.layers,
                      num_attention_heads=sizes.heads, intermediate_size=2 * sizes.hidden,
                      image_size=sizes.image_size, patch_size=sizes.patch_size, num_channels=3,
                      max_position_embeddings=sizes.max_positions, modality_type_vocab_size=2, max_image_length=-1,
                      initializer_range=sizes.initializer_range)


def tiny_vilt(vocab_size: int, sizes: TinyViltSizes = TinyViltSizes(), seed: int = 0):
    from transformers import ViltModel

    torch.manual_seed(seed)
    return ViltModel(tiny_vilt_config(vocab_size, sizes)).eval()


def build_tiny_vilt(path: str, words: Sequence[str], sizes: TinyViltSizes = TinyViltSizes(), seed: int = 0) -> str:
    """Save a random tiny ViltModel and a ViltProcessor (a BERT word-piece tokenizer whose vocabulary
    is the special tokens plus ``words``; images resized to ``sizes.image_size``) in ``path``."""
    from transformers import BertTokenizerFast, ViltImageProcessor, ViltProcessor

    os.makedirs(path, exist_ok=True)
    # A vocabulary dict: transformers 5 ignores ``vocab_file=`` and would build a special-tokens-only
    # tokenizer that maps every word to [UNK].
    vocab = {token: i for i, token in enumerate(dict.fromkeys([*SPECIAL_TOKENS, *words]))}
    tokenizer = BertTokenizerFast(vocab=vocab)
    if tokenizer.convert_tokens_to_ids(list(vocab)) != list(vocab.values()):
        raise RuntimeError("the tiny ViLT tokenizer did not take the given vocabulary")
    image_processor = ViltImageProcessor(size={"shortest_edge": sizes.image_size}, size_divisor=sizes.patch_size)
    ViltProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(path)
    tiny_vilt(len(tokenizer), sizes, seed).save_pretrained(path)
    return path
