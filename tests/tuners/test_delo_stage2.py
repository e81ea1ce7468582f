"""Stage 2 with ``tuner: delo`` inside the MLLM's LLM (per-token modality ids from the
MultimodalLM's tracking context): trains, saves and reloads with identical generations."""

from __future__ import annotations

import yaml

from mllm.config import config_from_dict
from mllm.model import MultimodalLM
from mllm.train.stages import run_instruct
from tests.train.test_stages import _config, stage1_dir  # noqa: F401  (module fixture)
from tests.train.test_stages import generate_token_ids

TUNER_YAML = """
tuner:
  type: delo
  r: 2
  alpha: 4
  dropout: 0.0
  options:
    num_experts: 4
    num_tasks: 2
"""


def test_yaml_selects_delo_and_stage2_trains_saves_and_reloads(tiny_assets, demo_data, stage1_dir, tmp_path):
    cfg = _config(tiny_assets, demo_data, tmp_path, "instruct", pretrained_projectors=stage1_dir, max_steps=1)
    cfg.tuner = config_from_dict(yaml.safe_load(TUNER_YAML)).tuner
    model = run_instruct(cfg)
    tuner = model.llm.base_model
    assert type(tuner).__name__ == "DeloModel"
    trained = {n: p for n, p in model.llm.named_parameters() if p.requires_grad}
    assert trained and all("delo_" in n and n.endswith(".0") for n in trained)   # task 0 only
    assert any(bool(p.abs().sum() > 0) for n, p in trained.items() if ".b_" in n)
    assert tuner.delo_query["default"].counts[0].sum() > 0 and tuner.delo_query["default"].counts[1].sum() == 0
    live = generate_token_ids(model, demo_data["eval"], demo_data["media_root"])
    reloaded = MultimodalLM.from_pretrained(str(tmp_path))
    assert reloaded.tuner_config.type == "delo"
    assert generate_token_ids(reloaded, demo_data["eval"], demo_data["media_root"]) == live
