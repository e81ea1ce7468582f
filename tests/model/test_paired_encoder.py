"""MoRA pairing an audio encoder (BEATs) or the speech encoder (Whisper) with the LLM: the
encoder-specific projection names pair with the LLM's, the adapted model starts as the base model,
and the encoder's MoRA factors train through ``encode_media``. (CLIP through stage 2:
tests/tuners/test_mora_stage2.py.)"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mllm.config import TunerConfig, config_from_dict
from mllm.model import MultimodalLM
from mllm.model.paired_encoder import decoder_layers_path
from mllm.tuners.mora import MoraLayer
from tests.model.test_audio_speech import audio_model_section  # noqa: F401  (module fixture)

# The last layer of each encoder (select_layer -1) pairs with the LLM's last layer.
EXPECTED = {"audio": ("<audio>", "model.encoder.layers.1.self_attn", ("out_proj", "q_proj")),
            "speech": ("<speech>", "audio_encoder.blocks.1.attn", ("out", "query"))}


@pytest.mark.parametrize("name", ["audio", "speech"])
def test_audio_encoders_pair_their_own_projections_with_the_llm(audio_model_section, name):
    torch.manual_seed(0)
    model = MultimodalLM.from_config(config_from_dict({"model": audio_model_section}).model)
    placeholder, layer, projections = EXPECTED[name]
    encoder = model.encoders[name]
    assert encoder.num_used_layers() == 2
    clip = {"audio": np.random.default_rng(0).standard_normal(16000).astype(np.float32),
            "speech": np.random.default_rng(0).standard_normal(32000).astype(np.float32)}[name]
    inputs = model.processor.preprocess(placeholder, clip)[None]
    with torch.no_grad():
        base = model.encode_media(placeholder, inputs)

    model.freeze_llm()
    model.apply_tuner(TunerConfig(type="mora", r=4, dropout=0.0,
                                  options={"pair_encoder": name, "num_paired_layers": 1, "shared_r": 2}))
    adapted = sorted(n for n, m in encoder.named_modules() if isinstance(m, MoraLayer))
    assert adapted == [f"{layer}.{p}" for p in projections]
    text_layers = decoder_layers_path(model.base_llm)
    assert text_layers == "model.layers"
    shared = model.llm.base_model.mora_shared_text["default"]
    attention = layer.rsplit(".", 1)[-1]   # self_attn | attn: keys name the encoder's projection paths
    assert sorted(shared) == sorted(f"v1_t1_{attention}_{p}" for p in projections)
    features = model.encode_media(placeholder, inputs)
    torch.testing.assert_close(features, base, rtol=1e-5, atol=1e-5)   # identity at initialisation
    features.square().sum().backward()
    factors = {n: p for n, p in encoder.named_parameters() if "mora_" in n}
    assert len(factors) == 6 and all(p.grad is not None and p.grad.abs().sum() > 0 for p in factors.values())
