"""MoRA in the MLLM (issue 5, item 4): stage 2 pairs the CLIP tower's layers with the LLM's.

The tiny CLIP has 2 layers and LLaVA's ``select_layer=-2``, so only its first layer computes the
features; it pairs with the LLM's last layer."""

from __future__ import annotations

import pytest
import torch

from mllm.config import TunerConfig
from mllm.model import MultimodalLM
from mllm.model.paired_encoder import PAIRED_ENCODER
from mllm.train.stages import run_instruct
from mllm.tuners.mora import MoraLayer
from tests.test_modality_context import _batch
from tests.train.test_stages import _config, generate_token_ids, stage1_dir  # noqa: F401  (module fixture)

MORA = {"type": "mora", "r": 4, "dropout": 0.0,
        "options": {"pair_encoder": "visual", "num_paired_layers": 1, "shared_r": 2, "alpha": 1.0}}


def _mora_layers(module) -> dict[str, MoraLayer]:
    return {name: m for name, m in module.named_modules() if isinstance(m, MoraLayer)}


def _paired_model(tiny_model, **options) -> MultimodalLM:
    tiny_model.freeze_llm()
    tiny_model.apply_tuner(TunerConfig(**{**MORA, "options": {**MORA["options"], **options}}))
    return tiny_model


def test_pairs_the_used_clip_layer_with_the_last_llm_layer(tiny_model):
    model = _paired_model(tiny_model)
    encoder_layers = _mora_layers(model.encoders["visual"])
    assert sorted(encoder_layers) == ["vision_model.encoder.layers.0.self_attn.out_proj",
                                      "vision_model.encoder.layers.0.self_attn.q_proj"]
    llm_layers = sorted(n.split("model.layers.")[1] for n in _mora_layers(model.base_llm)
                        if not n.startswith(PAIRED_ENCODER))
    assert llm_layers == ["1.self_attn.o_proj", "1.self_attn.q_proj"]
    tuner = model.llm.base_model
    # One S^v / S^t / a^s per (layer pair, projection): q with q, CLIP's out_proj with the LLM's o_proj.
    assert sorted(tuner.mora_shared_vision["default"]) == ["v0_t1_self_attn_out_proj", "v0_t1_self_attn_q_proj"]
    clip_width = model.encoders["visual"].hidden_size
    llm_width = model.base_llm.config.hidden_size
    assert tuner.mora_shared_vision["default"]["v0_t1_self_attn_q_proj"].shape[1] == clip_width
    assert tuner.mora_shared_text["default"]["v0_t1_self_attn_q_proj"].shape[1] == llm_width


def test_identity_at_init_and_gradients_reach_the_encoder_factors(tiny_model):
    batch = _batch(tiny_model, "right")
    with torch.no_grad():
        base = tiny_model.eval()(**batch).logits
    model = _paired_model(tiny_model)
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, base, rtol=1e-5, atol=1e-5)
    labels = batch["input_ids"].masked_fill(batch["input_ids"] >= model.base_llm.config.vocab_size, -100)
    model(**batch, labels=labels).loss.backward()
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert all("mora_" in n or n.startswith("projectors.") for n in trainable)
    encoder_factors = [n for n in trainable if PAIRED_ENCODER in n]
    assert {n.split(".")[-2] for n in encoder_factors} == {"mora_A", "mora_B", "mora_magnitude"}
    for name in encoder_factors + [n for n in trainable if "mora_shared" in n]:
        assert trainable[name].grad is not None and trainable[name].grad.abs().sum() > 0, name
    frozen = [p for p in model.encoders["visual"].parameters() if not p.requires_grad]
    assert frozen and all(p.grad is None for p in frozen)


def test_stage2_trains_saves_reloads_and_merges(tiny_assets, demo_data, stage1_dir, tmp_path):
    cfg = _config(tiny_assets, demo_data, tmp_path, "instruct", pretrained_projectors=stage1_dir, max_steps=2)
    cfg.tuner = TunerConfig(**MORA)
    model = run_instruct(cfg)
    # The CLIP weights on disk are untouched; the adapted tower computes something else.
    clip_base = MultimodalLM.from_config(cfg.model).encoders["visual"]
    base_state = clip_base.state_dict()
    assert all(torch.equal(base_state[n], p) for n, p in model.encoders["visual"].state_dict().items()
               if n in base_state and "base_layer" not in n)
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert not torch.allclose(model.encoders["visual"](pixels), clip_base(pixels), atol=1e-4)

    live = generate_token_ids(model, demo_data["eval"], demo_data["media_root"])
    reloaded = MultimodalLM.from_pretrained(str(tmp_path))
    assert reloaded.tuner_config.options["pair_encoder"] == "visual"
    assert len(_mora_layers(reloaded.encoders["visual"])) == 2
    assert generate_token_ids(reloaded, demo_data["eval"], demo_data["media_root"]) == live

    batch = _batch(reloaded, "right")
    with torch.no_grad():
        before = reloaded(**batch).logits
        reloaded.merge_tuner()
        after = reloaded(**batch).logits
    assert not _mora_layers(reloaded) and PAIRED_ENCODER not in reloaded.llm._modules
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-5)


def test_configuration_errors_name_the_option(tiny_assets, tiny_model, tmp_path):
    with pytest.raises(ValueError, match="pair_encoder to one of \\['visual'\\]"):
        _paired_model(tiny_model, pair_encoder="audio")
    with pytest.raises(ValueError, match="num_paired_layers=2: the visual encoder computes its features with 1"):
        _paired_model(tiny_model, num_paired_layers=2)
    with pytest.raises(ValueError, match="pair_encoder is an option of tuners that pair an encoder"):
        tiny_model.apply_tuner(TunerConfig(type="lora", options={"pair_encoder": "visual"}))
    from mllm.config import config_from_dict
    from tests.conftest import model_section

    cached = MultimodalLM.from_config(config_from_dict(
        {"model": model_section(tiny_assets, feature_cache=str(tmp_path / "cache"))}).model)
    with pytest.raises(ValueError, match="feature_cache"):
        _paired_model(cached)


def test_recipe_parses_and_its_tuner_section_applies(tiny_model):
    """configs/mora/instruct_clip_llama.yaml: valid sections; its tuner pairs the tiny model's
    towers (one pair: the tiny CLIP computes its features with one layer)."""
    import os

    from mllm.config import load_config
    from mllm.train.trainer import MllmTrainingArguments

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    cfg = load_config(os.path.join(root, "configs", "mora", "instruct_clip_llama.yaml"))
    assert cfg.model.encoders["visual"].select_layer == -2 and cfg.model.feature_cache is None
    MllmTrainingArguments(**{**cfg.training, "bf16": False, "use_cpu": True})   # bf16 needs a GPU
    assert cfg.tuner.options["num_paired_layers"] == 2
    cfg.tuner.options["num_paired_layers"] = 1
    tiny_model.freeze_llm()
    tiny_model.apply_tuner(cfg.tuner)
    assert len(_mora_layers(tiny_model.encoders["visual"])) == 2
    assert tiny_model.llm.peft_config["default"].shared_r == 8 and tiny_model.llm.peft_config["default"].alpha == 0.1
