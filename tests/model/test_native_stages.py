"""Stages on a native backbone (tiny Qwen2.5-VL + a BEATs audio branch) through the HF Trainer:
stage 1 trains only the new projectors, stage 2 projectors + MokA in the language model (+ the
native connector when asked); outputs hold only what trained and reload from the backbone path."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from mllm.config import config_from_dict
from mllm.data.synthetic_av import write_av_demo_dataset
from mllm.model import MultimodalLM
from mllm.train.stages import run_instruct, run_pretrain
from tests.conftest import TINY_PROJECTOR
from tests.model.test_native_backbones import native_dirs  # noqa: F401 (fixture)
from tests.train.test_stages import TRAINING

MOKA = {"type": "moka", "r": 4, "alpha": 8, "options": {"modalities": ["text", "visual", "audio"]}}


@pytest.fixture(scope="module")
def av_data(tmp_path_factory):
    return write_av_demo_dataset(tmp_path_factory.mktemp("av"), seed=0, num_pretrain=8, num_instruct=8, num_eval=4)


def _config(native_dirs, av_data, out, stage, **model_extra):
    model = {"llm": native_dirs["qwen2_5_vl"],
             "encoders": {"audio": {"type": "beats", "path": native_dirs["beats"], "num_windows": 2,
                                    "window_seconds": 1.0}},
             "projectors": {"audio": dict(TINY_PROJECTOR)}, **model_extra}
    return config_from_dict({
        "model": model,
        "data": {"train": av_data[stage if stage == "pretrain" else "instruct"], "media_root": av_data["media_root"],
                 "template": "plain" if stage == "pretrain" else "auto"},
        "tuner": {"type": "none"} if stage == "pretrain" else MOKA,
        "training": {**TRAINING, "per_device_train_batch_size": 4, "output_dir": str(out), "max_steps": 2}})


def _snapshot(module):
    return {n: p.detach().clone() for n, p in module.state_dict().items()}


def _changed(before, module):
    return {n for n, p in module.state_dict().items() if n in before and not torch.equal(p, before[n])}


@pytest.fixture(scope="module")
def stage1_dir(native_dirs, av_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("native-stage1")
    cfg = _config(native_dirs, av_data, out, "pretrain")
    model = MultimodalLM.from_config(cfg.model)
    llm, projectors = _snapshot(model.llm), _snapshot(model.projectors)
    run_pretrain(cfg, model)
    assert not _changed(llm, model.llm), "stage 1 changed the native backbone"
    assert len(_changed(projectors, model.projectors)) > 0.8 * len(projectors)
    files = set(os.listdir(out))
    assert {"projectors.safetensors", "mllm_config.json"} <= files
    assert not any(f.startswith("model") and f.endswith(".safetensors") for f in files)
    assert "native_connector.safetensors" not in files
    return str(out)


def test_stage1_trains_only_the_new_projectors(stage1_dir):
    assert os.path.isfile(os.path.join(stage1_dir, "projectors.safetensors"))


@pytest.mark.parametrize("connector", [False, True], ids=["frozen-connector", "trained-connector"])
def test_stage2_trains_projectors_and_moka_and_the_connector_when_asked(native_dirs, av_data, stage1_dir,
                                                                         tmp_path, connector):
    cfg = _config(native_dirs, av_data, tmp_path, "instruct", pretrained_projectors=stage1_dir,
                  train_native_connector=connector)
    model = MultimodalLM.from_config(cfg.model)
    base, projectors = _snapshot(model.llm), _snapshot(model.projectors)
    run_instruct(cfg, model)
    assert _changed(projectors, model.projectors)
    changed = {n.replace("base_layer.", "") for n in _changed(base, model.base_llm)}
    changed |= {n for n, p in model.base_llm.named_parameters() if "moka_B" in n and bool(p.abs().sum() > 0)}
    assert any("moka_" in n for n in changed)
    outside = {n for n in changed if "moka_" not in n}
    if connector:
        assert outside and all(n.startswith("model.visual.merger.") for n in outside)
    else:
        assert not outside
    files = set(os.listdir(tmp_path))
    assert ("native_connector.safetensors" in files) == connector
    assert os.path.isfile(os.path.join(tmp_path, "adapter", "adapter_model.safetensors"))


GENERATE_SCRIPT = """
import json, sys
from mllm.model import MultimodalLM
from tests.train.test_stages import generate_token_ids
print(json.dumps(generate_token_ids(MultimodalLM.from_pretrained(sys.argv[1]), sys.argv[2], sys.argv[3])))
"""


def test_save_reload_in_a_fresh_process_generates_identically(native_dirs, av_data, stage1_dir, tmp_path):
    from tests.train.test_stages import generate_token_ids

    cfg = _config(native_dirs, av_data, tmp_path, "instruct", pretrained_projectors=stage1_dir,
                  train_native_connector=True)
    model = run_instruct(cfg)
    live = generate_token_ids(model, av_data["eval"], av_data["media_root"])
    repo_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    out = subprocess.run([sys.executable, "-c", GENERATE_SCRIPT, str(tmp_path), av_data["eval"],
                          av_data["media_root"]], capture_output=True, text=True, cwd=repo_root,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    reloaded = json.loads(out.stdout.strip().splitlines()[-1])
    assert len(live) == 4 and reloaded == live
