"""Output folders belong to one run; the checks before any model loads (mllm.train.run_folder,
mllm.train.stages.preflight). The true resume reaching the uninterrupted weights is in
test_stages.py (test_resume_reaches_the_same_weights, test_run_killed_after_a_checkpoint_...)."""

from __future__ import annotations

import json
import logging
import os
import shutil

import pytest

from mllm.checkpoint import RUN_FINGERPRINT_FILE as FINGERPRINT_FILE
from mllm.config import ConfigError
from mllm.data.schema import RecordError
from mllm.model import MultimodalLM
from mllm.train.run_folder import check_output_dir
from mllm.train.stages import run_pretrain
from tests.train.test_stages import _config


@pytest.fixture
def no_model_loads(monkeypatch):
    """Every check here must fail before a model is built."""
    def fail(*args, **kwargs):
        raise AssertionError("a model was loaded before the check failed")

    monkeypatch.setattr(MultimodalLM, "from_config", classmethod(fail))


def _train_copy(demo_data, tmp_path, records=None):
    lines = open(demo_data["pretrain"]).read().splitlines()[:16]
    path = tmp_path / "train.jsonl"
    path.write_text("".join(line + "\n" for line in (records if records is not None else lines)))
    return str(path)


@pytest.fixture(scope="module")
def finished_run(tiny_assets, demo_data, tmp_path_factory):
    """A stage-1 run of 4 steps with checkpoints at steps 2 and 4, on its own copy of the data."""
    folder = tmp_path_factory.mktemp("finished")
    cfg = _config(tiny_assets, demo_data, folder / "run", "pretrain", max_steps=4, save_steps=2)
    cfg.data.train = _train_copy(demo_data, folder)
    run_pretrain(cfg)
    return folder


def test_a_second_run_into_a_used_folder_is_refused(tiny_assets, demo_data, finished_run, no_model_loads):
    out = finished_run / "run"
    cfg = _config(tiny_assets, demo_data, out, "pretrain", max_steps=4, save_steps=2)
    cfg.data.train = str(finished_run / "train.jsonl")
    with pytest.raises(ConfigError, match=rf"training\.output_dir={out} already holds a run of this same config "
                                          r"\(checkpoint-2, checkpoint-4, .*training\.overwrite_output_dir=true"):
        run_pretrain(cfg)
    cfg.training["learning_rate"] = 2e-2
    with pytest.raises(ConfigError, match="already holds another run"):
        run_pretrain(cfg)
    assert sorted(os.listdir(out / "checkpoint-4")) and (out / "projectors.safetensors").is_file()  # untouched


def test_overwrite_output_dir_replaces_the_old_run(tiny_assets, demo_data, tmp_path):
    out = tmp_path / "run"
    run_pretrain(_config(tiny_assets, demo_data, out, "pretrain", max_steps=2, save_steps=1))
    (out / "notes.txt").write_text("mine")
    assert (out / "checkpoint-2").is_dir()
    run_pretrain(_config(tiny_assets, demo_data, out, "pretrain", max_steps=1, save_steps=1000,
                         overwrite_output_dir=True))
    files = set(os.listdir(out))
    assert sorted(name for name in files if name.startswith("checkpoint-")) == ["checkpoint-1"]  # old ones gone
    assert {"projectors.safetensors", FINGERPRINT_FILE, "notes.txt"} <= files  # a file no run writes is kept
    assert json.loads((out / FINGERPRINT_FILE).read_text())["config"]["training.max_steps"] == 1
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == 1


def test_a_resume_with_a_changed_config_or_data_is_refused_naming_what_changed(tiny_assets, demo_data, finished_run,
                                                                               tmp_path, no_model_loads):
    out = finished_run / "run"
    data = tmp_path / "train.jsonl"
    shutil.copy(finished_run / "train.jsonl", data)

    def resume(checkpoint, **training):
        training = {"max_steps": 4, "save_steps": 2, **training}
        cfg = _config(tiny_assets, demo_data, out, "pretrain", resume_from_checkpoint=checkpoint, **training)
        cfg.data.train = str(data)
        return cfg

    checkpoint = str(out / "checkpoint-2")
    assert json.loads(open(os.path.join(checkpoint, FINGERPRINT_FILE)).read())["config"]
    with pytest.raises(ConfigError, match=rf"cannot resume from {checkpoint}: it was written by a run with a "
                                          r"different config or data: training\.learning_rate: 0\.01 -> 0\.02; "
                                          r"training\.max_steps: 4 -> 5"):
        run_pretrain(resume(checkpoint, learning_rate=2e-2, max_steps=5))
    with pytest.raises(ConfigError, match=r"tuner\.r: 4 -> 8"):
        cfg = resume(checkpoint)
        cfg.tuner.r = 8
        run_pretrain(cfg)
    with open(data, "a") as f:
        f.write(open(data).readline())
    with pytest.raises(ConfigError, match=r"different config or data: data\.train \(file contents changed\)"):
        run_pretrain(resume(checkpoint))
    shutil.copy(finished_run / "train.jsonl", data)
    # Where and how often it logs or saves is not part of what the run computes.
    plan = check_output_dir(resume(checkpoint, logging_steps=7, save_steps=3), str(out), checkpoint)
    assert plan.resume_from == checkpoint and plan.to_clear == []


def test_a_resume_with_no_steps_left_is_refused(tiny_assets, demo_data, finished_run, no_model_loads):
    """Today it trains 0 steps, exits 0 with train_loss 0 and leaves the old weights as the output."""
    out = finished_run / "run"
    cfg = _config(tiny_assets, demo_data, out, "pretrain", max_steps=4, save_steps=2, resume_from_checkpoint=True)
    cfg.data.train = str(finished_run / "train.jsonl")
    with pytest.raises(ConfigError, match=rf"cannot resume from {out / 'checkpoint-4'}: it already completed all 4 "
                                          r"steps of its run, so 0 would be left to train"):
        run_pretrain(cfg)


@pytest.mark.parametrize("record,message", [
    ({"images": "images/x.png"},
     r"train\.jsonl:2: record 'bad': unknown media field 'images' \(did you mean 'image'\?\)"),
    ({"image": "images/missing.png", "question": "<image>\nWhat is it?"},
     r"train\.jsonl:2: record 'bad': 'image' file not found: .*images/missing\.png"),
])
def test_an_unknown_media_field_or_a_missing_path_stops_the_stage_before_the_first_step(
        tiny_assets, demo_data, tmp_path, no_model_loads, record, message):
    good = json.loads(open(demo_data["pretrain"]).readline())
    question = record.pop("question", "Describe the picture.")
    bad = {"id": "bad", "conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": "red"}],
           **record}
    cfg = _config(tiny_assets, demo_data, tmp_path / "run", "pretrain")
    cfg.data.train = _train_copy(demo_data, tmp_path, [json.dumps(good), json.dumps(bad)])
    with pytest.raises(RecordError, match=message):
        run_pretrain(cfg)
    assert not os.path.exists(tmp_path / "run")


def test_bad_records_are_counted_once_under_skip(tiny_assets, demo_data, tmp_path, caplog):
    """Six bad records of five kinds, over three epochs: reported as six (today: fourteen)."""
    lines = open(demo_data["pretrain"]).read().splitlines()[:8]
    good = [json.loads(line) for line in lines]
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 20)
    bad = [dict(good[0], id="typo", image=None, images=good[0]["image"],                    # unknown media field
                conversations=[{"from": "human", "value": "Describe it."}, {"from": "gpt", "value": "x"}]),
           dict(good[1], id="gone", image="images/missing.png"),                             # missing file
           dict(good[2], id="tags", conversations=[{"from": "human", "value": "<image><image>"},
                                                   {"from": "gpt", "value": "x"}]),            # placeholder count
           dict(good[3], id="corrupt1", image=str(corrupt)), dict(good[4], id="corrupt2", image=str(corrupt))]
    for record in bad:
        if record.get("image") is None:
            record.pop("image")
    train = _train_copy(demo_data, tmp_path, [json.dumps(r) for r in good + bad] + ["{not json"])
    cfg = _config(tiny_assets, demo_data, tmp_path / "run", "pretrain", max_steps=-1, num_train_epochs=3,
                  per_device_train_batch_size=4)
    cfg.data.train, cfg.data.on_bad_sample = train, "skip"
    with caplog.at_level(logging.INFO, logger="mllm"):
        run_pretrain(cfg)
    messages = [r.getMessage() for r in caplog.records]
    assert (f"data.train {train}: 10 records loaded (image 10); skipped 4 bad record(s): 1 unknown media field, "
            f"1 missing media file, 1 placeholder count mismatch, 1 malformed JSON") in messages
    summary = [m for m in messages if m.startswith("skipped ")]
    assert len(summary) == 1 and summary[0].startswith("skipped 6 bad training record(s), each once"), summary
    # Each corrupt record was read once, in the first epoch, never again.
    assert sum("skipping unreadable media" in m for m in messages) == 2
    assert any(m.startswith(f"saved to {tmp_path / 'run'}: projectors (visual)") for m in messages)


def test_a_resume_into_a_folder_of_another_run_is_refused(tiny_assets, demo_data, finished_run, tmp_path):
    checkpoint = str(finished_run / "run" / "checkpoint-2")
    cfg = _config(tiny_assets, demo_data, tmp_path / "elsewhere", "pretrain", max_steps=4, save_steps=2,
                  resume_from_checkpoint=checkpoint)
    cfg.data.train = str(finished_run / "train.jsonl")
    assert check_output_dir(cfg, str(tmp_path / "elsewhere"), checkpoint).resume_from == checkpoint  # empty: fine
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "projectors.safetensors").write_bytes(b"another run's")
    with pytest.raises(ConfigError, match="already holds another run"):
        check_output_dir(cfg, str(tmp_path / "elsewhere"), checkpoint)
    plan = check_output_dir(cfg, str(tmp_path / "elsewhere"), checkpoint, overwrite=True)
    assert plan.resume_from == checkpoint and plan.to_clear == [str(tmp_path / "elsewhere" / "projectors.safetensors")]
