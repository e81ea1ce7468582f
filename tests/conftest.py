"""Shared fixtures: tiny real models and generated data, built once per test session."""

from __future__ import annotations

import json
import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TINY_PROJECTOR = {"num_queries": 4, "hidden_size": 32, "num_layers": 2, "num_heads": 4,
                  "intermediate_size": 64, "dropout": 0.0}


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory):
    from mllm.data.synthetic import write_demo_dataset

    return write_demo_dataset(tmp_path_factory.mktemp("data"), seed=1, num_pretrain=64,
                              num_instruct=96, num_eval=16, num_video=4)


@pytest.fixture(scope="session")
def tiny_assets(tmp_path_factory, demo_data):
    """A tiny CLIP tower and a tiny LLaMA + tokenizer saved to disk (random weights)."""
    from mllm.demo.assets import TinySizes, build_tiny_assets

    corpus = []
    for name in ("pretrain", "instruct"):
        with open(demo_data[name]) as f:
            for line in f:
                corpus += [t["value"] for t in json.loads(line)["conversations"]]
    sizes = TinySizes(llm_hidden=32, vision_hidden=32, llm_heads=4, vocab_size=400)
    return build_tiny_assets(str(tmp_path_factory.mktemp("assets")), corpus, sizes=sizes)


def model_section(tiny_assets, **extra) -> dict:
    return {
        "llm": tiny_assets["llm"],
        "video_frames": 2,
        "encoders": {"visual": {"type": "clip", "path": tiny_assets["clip"]}},
        "projectors": {"visual": dict(TINY_PROJECTOR)},
        **extra,
    }


@pytest.fixture
def tiny_model(tiny_assets):
    """A fresh ``MultimodalLM`` over the tiny assets."""
    import torch

    from mllm.config import config_from_dict
    from mllm.model import MultimodalLM

    torch.manual_seed(0)
    cfg = config_from_dict({"model": model_section(tiny_assets)})
    return MultimodalLM.from_config(cfg.model)
