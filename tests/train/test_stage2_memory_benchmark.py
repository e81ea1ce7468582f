"""benchmarks/stage2_memory.py measures the shapes it names (built on the meta device: no memory)."""

from __future__ import annotations

import importlib.util
import os

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _bench():
    spec = importlib.util.spec_from_file_location("stage2_memory", os.path.join(ROOT, "benchmarks", "stage2_memory.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_full_size_shapes_are_llama_2_7b_and_clip_vit_l_14():
    from transformers import CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM

    bench = _bench()
    with torch.device("meta"):
        llm = LlamaForCausalLM(LlamaConfig(**bench.LLAMA_2_7B, tie_word_embeddings=False))
        clip = CLIPVisionModel(CLIPVisionConfig(**bench.CLIP_L_14))
    assert round(sum(p.numel() for p in llm.parameters()) / 1e9, 2) == 6.74      # LLaMA-2-7B
    assert round(sum(p.numel() for p in clip.parameters()) / 1e6, 1) == 303.2    # ViT-L/14 vision tower
    assert clip.config.image_size // clip.config.patch_size == 16                # 256 patches
