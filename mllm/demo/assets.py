"""Tiny models for the embedded demo and the tests, built from configs and saved locally.

Nothing can be downloaded, so the demo builds a tiny CLIP vision tower (random weights), a
tokenizer trained on the demo's own text and a tiny LLaMA-architecture LM, saves them with
``save_pretrained`` and from then on loads them through the same ``from_pretrained`` paths a
real checkpoint takes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Iterable

import torch
from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM


@dataclass
class TinySizes:
    image_size: int = 32
    patch_size: int = 4
    vision_hidden: int = 128
    vision_layers: int = 2
    llm_hidden: int = 128
    llm_layers: int = 2
    llm_heads: int = 4
    max_positions: int = 256
    vocab_size: int = 512


def build_tiny_clip(output_dir: str, sizes: TinySizes = TinySizes(), seed: int = 0) -> str:
    torch.manual_seed(seed)
    config = CLIPVisionConfig(
        hidden_size=sizes.vision_hidden, intermediate_size=sizes.vision_hidden * 2,
        num_hidden_layers=sizes.vision_layers, num_attention_heads=4,
        image_size=sizes.image_size, patch_size=sizes.patch_size, projection_dim=sizes.vision_hidden,
    )
    CLIPVisionModel(config).save_pretrained(output_dir)
    CLIPImageProcessor(
        size={"shortest_edge": sizes.image_size},
        crop_size={"height": sizes.image_size, "width": sizes.image_size},
    ).save_pretrained(output_dir)
    return output_dir


def build_tiny_llama(output_dir: str, tokenizer, sizes: TinySizes = TinySizes(), seed: int = 0) -> LlamaForCausalLM:
    """A random tiny LLaMA sized to the tokenizer (placeholders are added later and need no
    embedding rows). Saved with the tokenizer so the folder is a complete HF checkpoint."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=sizes.llm_hidden, intermediate_size=sizes.llm_hidden * 2,
        num_hidden_layers=sizes.llm_layers, num_attention_heads=sizes.llm_heads,
        num_key_value_heads=max(1, sizes.llm_heads // 2), max_position_embeddings=sizes.max_positions,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    model.save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)
    return model


def pretrain_tiny_lm(model_dir: str, texts: Iterable[str], steps: int = 300, batch_size: int = 32,
                     lr: float = 3e-3, seed: int = 0, progress: bool = True) -> None:
    """Give the tiny LM some language first (the demo's text, media removed), as a real
    pretrained LLM would have. Plain next-token training; saved back in place."""
    from tqdm.auto import tqdm
    from transformers import AutoTokenizer

    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.train()
    encoded = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    encoded = [ids[: model.config.max_position_embeddings] for ids in encoded if ids]
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(seed)
    for step in tqdm(range(steps), desc="tiny LM text pretraining", disable=not progress):
        picks = torch.randint(len(encoded), (batch_size,), generator=generator).tolist()
        batch = [encoded[i] for i in picks]
        length = max(len(ids) for ids in batch)
        input_ids = torch.full((batch_size, length), tokenizer.pad_token_id)
        labels = torch.full((batch_size, length), -100)
        attention = torch.zeros((batch_size, length), dtype=torch.long)
        for row, ids in enumerate(batch):
            input_ids[row, : len(ids)] = torch.tensor(ids)
            labels[row, : len(ids)] = torch.tensor(ids)
            attention[row, : len(ids)] = 1
        for group in optimizer.param_groups:  # linear decay
            group["lr"] = lr * (1 - step / steps)
        loss = model(input_ids=input_ids, attention_mask=attention, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.save_pretrained(model_dir)


def build_tiny_assets(output_dir: str, corpus: list[str], sizes: TinySizes = TinySizes(),
                      tokenizer_style: str | None = None, seed: int = 0) -> dict[str, str]:
    """Build (once) the tiny CLIP tower and tiny LLaMA + tokenizer under ``output_dir``.
    Returns their paths; existing complete folders are reused."""
    from mllm.data.tiny_tokenizer import build_tiny_tokenizer

    clip_dir = os.path.join(output_dir, "tiny-clip")
    llm_dir = os.path.join(output_dir, "tiny-llama")
    if not os.path.isfile(os.path.join(clip_dir, "config.json")):
        build_tiny_clip(clip_dir, sizes, seed)
    if not os.path.isfile(os.path.join(llm_dir, "config.json")):
        tokenizer = build_tiny_tokenizer(corpus, style=tokenizer_style, vocab_size=sizes.vocab_size)
        build_tiny_llama(llm_dir, tokenizer, sizes, seed)
    return {"clip": clip_dir, "llm": llm_dir}


def build_tiny_beats(path: str, seed: int = 0) -> str:
    """A tiny random BEATs saved exactly like the official ``.pt`` files (``{'cfg', 'model'}``),
    so the demo loads it through the same path as ``BEATs_iter3_plus_AS2M.pt``."""
    from dataclasses import asdict

    from mllm.encoders.beats import BEATsConfig, BEATsModel

    torch.manual_seed(seed)
    config = BEATsConfig(embed_dim=32, encoder_layers=2, encoder_embed_dim=64, encoder_ffn_embed_dim=128,
                         encoder_attention_heads=4, conv_pos=16, conv_pos_groups=4, num_buckets=32,
                         max_distance=64)
    model = BEATsModel(config)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    torch.save({"cfg": asdict(config), "model": model.state_dict()}, path)
    return path
