"""Stage 2 with ``tuner: moka``: trains, checkpoints, resumes and reloads like LoRA."""

from __future__ import annotations

import yaml

from mllm.config import config_from_dict
from mllm.model import MultimodalLM
from mllm.train.stages import run_instruct
from tests.train.test_stages import _config, assert_same_trained_weights, generate_token_ids, stage1_dir  # noqa: F401  (module fixture)

TUNER_YAML = """
tuner:
  type: moka
  r: 4
  alpha: 8
  dropout: 0.0
  options:
    modalities: [text, visual]
    strengths: {visual: 1.0}
"""


def _moka_config(tiny_assets, demo_data, out, stage1, **training):
    cfg = _config(tiny_assets, demo_data, out, "instruct", pretrained_projectors=stage1, **training)
    cfg.tuner = config_from_dict(yaml.safe_load(TUNER_YAML)).tuner
    return cfg


def test_yaml_selects_moka_and_stage2_trains_saves_and_reloads(tiny_assets, demo_data, stage1_dir, tmp_path):
    cfg = _moka_config(tiny_assets, demo_data, tmp_path, stage1_dir)
    assert cfg.tuner.type == "moka"
    model = run_instruct(cfg)
    trained = {n: p for n, p in model.llm.named_parameters() if p.requires_grad}
    assert trained and all("moka_" in n for n in trained)
    assert any(bool(p.abs().sum() > 0) for n, p in trained.items() if "moka_B" in n)
    assert type(model.llm.base_model).__name__ == "MokaModel"
    live = generate_token_ids(model, demo_data["eval"], demo_data["media_root"])
    reloaded = MultimodalLM.from_pretrained(str(tmp_path))
    assert reloaded.tuner_config.type == "moka"
    assert generate_token_ids(reloaded, demo_data["eval"], demo_data["media_root"]) == live


def test_moka_resume_reaches_the_same_weights(tiny_assets, demo_data, stage1_dir, tmp_path):
    cfg = _moka_config(tiny_assets, demo_data, tmp_path, stage1_dir, max_steps=4, save_steps=2)
    straight = run_instruct(cfg)
    cfg.training["resume_from_checkpoint"] = str(tmp_path / "checkpoint-2")
    resumed = run_instruct(cfg)
    assert_same_trained_weights(resumed, straight)
