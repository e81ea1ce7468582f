"""A native backbone's trained connector (Qwen2.5-VL's merger) under DeepSpeed ZeRO-3 and on resume.

Real runs: stage 2 with ``model.train_native_connector`` in one process (the reference) and in two
under ``accelerate launch --use_deepspeed`` with ZeRO-3 (CPU, gloo, fp32). ZeRO-3 partitions the
connector, so a save must gather it (full shapes, the trained values, equal to the one-process
run), a reload must give the trained connector and not the released one, and a resume must go on
from the trained connector (ending where the uninterrupted run ended).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from mllm.checkpoint import NATIVE_CONNECTOR_FILE
from mllm.config import config_from_dict
from mllm.data.synthetic_av import write_av_demo_dataset
from mllm.model import MultimodalLM
from mllm.model.native.tiny import build_tiny_qwen_vl
from mllm.train.stages import run_instruct
from tests.conftest import TINY_PROJECTOR
from tests.encoders.test_beats import random_model, save_official
from tests.train.test_deepspeed import (
    MICRO_BATCH,
    ROOT,
    TRAINING,
    WORLD,
    _free_port,
    _launch_env,
    _multi_process,
    _single_process,
    assert_same_saves,
)


@pytest.fixture(scope="module")
def experiment(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("native-zero3")
    save_official(root / "beats.pt", random_model())
    llm = build_tiny_qwen_vl(str(root / "qwen2_5_vl"))
    data = write_av_demo_dataset(root / "av", seed=0, num_pretrain=2, num_instruct=12, num_eval=2)
    return {
        "model": {"llm": llm, "train_native_connector": True,
                  "encoders": {"audio": {"type": "beats", "path": str(root / "beats.pt"), "num_windows": 2,
                                         "window_seconds": 1.0}},
                  "projectors": {"audio": dict(TINY_PROJECTOR)}},
        "tuner": {"type": "lora", "r": 4, "alpha": 8, "dropout": 0.0},
        "data": {"train": data["instruct"], "media_root": data["media_root"], "template": "auto"},
        # 3 steps of 4 records, a checkpoint at step 2 to resume from.
        "training": {**TRAINING, "learning_rate": 0.5, "output_dir": str(root / "single")},
    }


@pytest.fixture(scope="module")
def runs(experiment, tmp_path_factory) -> dict:
    """The one-process reference and the two-process ZeRO-3 run over the same global batches."""
    out = tmp_path_factory.mktemp("native-zero3-runs")
    _single_process(experiment, "instruct")
    _multi_process(experiment, "instruct", "zero3.json", out, f"training.output_dir={out / 'zero3'}")
    return {"single": experiment["training"]["output_dir"], "zero3": str(out / "zero3")}


@pytest.fixture(scope="module")
def released(experiment) -> dict[str, torch.Tensor]:
    model = MultimodalLM.from_config(config_from_dict({"model": experiment["model"]}).model)
    return model.connector_state()


def _connector(folder) -> dict[str, torch.Tensor]:
    return load_file(os.path.join(folder, NATIVE_CONNECTOR_FILE))


def _assert_trained(connector: dict, released: dict) -> None:
    """Full shapes, and moved well away from the released connector."""
    assert sorted(connector) == sorted(released)
    for name, tensor in connector.items():
        assert tensor.shape == released[name].shape, f"{name}: {tuple(tensor.shape)}"
    assert max(float((connector[n] - released[n]).abs().max()) for n in connector) > 1e-2


def _assert_same(got: dict, want: dict) -> None:
    assert sorted(got) == sorted(want)
    for name, tensor in got.items():
        torch.testing.assert_close(tensor, want[name], rtol=1e-4, atol=1e-5, msg=name)


def test_zero3_saves_the_full_trained_connector(runs, released):
    # Under ZeRO-3 the larger merger Linears are partitioned (below the persistence threshold
    # the norm and biases are not): a save without gathering would write 0-sized tensors.
    assert os.path.isdir(os.path.join(runs["zero3"], "checkpoint-2", "global_step2"))  # it ran under DeepSpeed
    for sub in ("", "checkpoint-2"):
        zero3, single = _connector(os.path.join(runs["zero3"], sub)), _connector(os.path.join(runs["single"], sub))
        _assert_trained(zero3, released)
        _assert_same(zero3, single)
        assert_same_saves(os.path.join(runs["zero3"], sub), os.path.join(runs["single"], sub))


def test_reloading_gives_the_trained_connector_not_the_released_one(runs, released):
    model = MultimodalLM.from_pretrained(runs["zero3"])
    _assert_same(model.connector_state(), _connector(runs["zero3"]))
    _assert_trained(model.connector_state(), released)


def test_resume_under_zero3_goes_on_from_the_trained_connector(experiment, runs, tmp_path):
    resumed = tmp_path / "resumed"
    _multi_process(experiment, "instruct", "zero3.json", tmp_path, f"training.output_dir={resumed}",
                   f"training.resume_from_checkpoint={os.path.join(runs['zero3'], 'checkpoint-2')}")
    assert json.load(open(resumed / "checkpoint-3" / "trainer_state.json"))["global_step"] == 3
    _assert_same(_connector(resumed), _connector(runs["zero3"]))
    assert_same_saves(resumed, runs["zero3"])


def test_resume_in_one_process_goes_on_from_the_trained_connector(experiment, runs, tmp_path):
    # Without DeepSpeed the Trainer resumes through load_trainable_weights: it must put the
    # checkpoint's connector back (the model was rebuilt with the released one).
    cfg = config_from_dict(experiment)
    cfg.training.update(per_device_train_batch_size=WORLD * MICRO_BATCH, output_dir=str(tmp_path / "resumed"),
                        resume_from_checkpoint=os.path.join(runs["single"], "checkpoint-2"))
    run_instruct(cfg)
    _assert_same(_connector(tmp_path / "resumed"), _connector(runs["single"]))


LOAD_PARTITIONED = """
import os, sys
import deepspeed, torch
from transformers.integrations import HfDeepSpeedConfig
from safetensors.torch import load_file
from mllm.distributed import is_partitioned
from mllm.model import MultimodalLM

deepspeed.init_distributed(dist_backend="gloo")
# As the Trainer does with zero3_init: from_pretrained builds the backbone partitioned.
keep = HfDeepSpeedConfig({"train_micro_batch_size_per_gpu": 1, "zero_optimization": {
    "stage": 3, "stage3_param_persistence_threshold": 0}})
model = MultimodalLM.from_pretrained(sys.argv[1])
assert all(is_partitioned(p) and p.numel() == 0 for p in model.connector().parameters())
saved = load_file(os.path.join(sys.argv[1], "native_connector.safetensors"))
state = model.connector_state()
assert sorted(state) == sorted(saved)
for name, tensor in state.items():
    assert torch.equal(tensor, saved[name]), name
model.save_pretrained(sys.argv[2], connector_state=state)
print("ok")
"""


def test_a_partitioned_backbone_loads_and_saves_the_trained_connector(runs, tmp_path):
    """Loading into a ZeRO-3-partitioned backbone (continuing from an output, model.continue_from)
    copies the saved connector into the partitions; gathering gives it back in full."""
    env = {**_launch_env(), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "RANK": "0",
           "LOCAL_RANK": "0", "WORLD_SIZE": "1"}
    out = subprocess.run([sys.executable, "-c", LOAD_PARTITIONED, runs["zero3"], str(tmp_path / "saved")],
                         capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), (out.stdout + out.stderr)[-4000:]
    _assert_same(_connector(tmp_path / "saved"), _connector(runs["zero3"]))
