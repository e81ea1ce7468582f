"""Both stages run as `accelerate launch stages/<stage>.py --config ... overrides`."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import yaml

from tests.conftest import model_section

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _launch(stage, config_path, *overrides, launcher_options=()):
    command = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", "--cpu", *launcher_options,
               os.path.join(ROOT, "stages", f"{stage}.py"), "--config", config_path, *overrides]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ROOT}
    return subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)


def test_two_stages_under_accelerate_launch(tiny_assets, demo_data, tmp_path):
    config = {
        "model": model_section(tiny_assets),
        "tuner": {"type": "none"},
        "data": {"train": demo_data["pretrain"], "media_root": demo_data["media_root"], "template": "plain"},
        "training": {"output_dir": str(tmp_path / "stage1"), "max_steps": 2, "per_device_train_batch_size": 4,
                     "learning_rate": 1e-3, "use_cpu": True, "disable_tqdm": True},
    }
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(config))
    stage1 = _launch("pretrain", str(path))
    assert stage1.returncode == 0, stage1.stderr[-3000:]
    assert (tmp_path / "stage1" / "projectors.safetensors").is_file()
    stage2 = _launch("instruct", str(path), "tuner.type=lora", "tuner.r=4", f"data.train={demo_data['instruct']}",
                     "data.template=auto", f"model.pretrained_projectors={tmp_path / 'stage1'}",
                     f"training.output_dir={tmp_path / 'stage2'}")
    assert stage2.returncode == 0, stage2.stderr[-3000:]
    assert (tmp_path / "stage2" / "adapter" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "stage2" / "experiment.yaml").is_file()


def test_a_user_error_under_accelerate_launch_ends_in_one_line(tiny_assets, demo_data, tmp_path):
    """`accelerate launch --quiet` (README, "When a run stops") passes the stage's one line through and
    adds no launcher traceback; the defaults accelerate would lecture about are all given here."""
    good = open(demo_data["pretrain"]).readline()
    typo = {"id": "typo", "images": "images/x.png",
            "conversations": [{"from": "human", "value": "Describe it."}, {"from": "gpt", "value": "red"}]}
    train = tmp_path / "train.jsonl"
    train.write_text(good + json.dumps(typo) + "\n")
    config = {"model": model_section(tiny_assets), "tuner": {"type": "none"},
              "data": {"train": str(train), "media_root": demo_data["media_root"], "template": "plain"},
              "training": {"output_dir": str(tmp_path / "run"), "max_steps": 1, "use_cpu": True}}
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(config))
    out = _launch("pretrain", str(path), launcher_options=["--quiet", "--num_cpu_threads_per_process", "1"])
    lines = out.stderr.splitlines()
    assert out.returncode == 1, out.stderr[-3000:]   # accelerate's status for a failed child under --quiet
    assert lines == [f"mllm pretrain: error: {train}:2: record 'typo': unknown media field 'images' (did you mean "
                     f"'image'?); media fields are image, video, audio, speech"], out.stderr[-3000:]
    assert not (tmp_path / "run").exists()
