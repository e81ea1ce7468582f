"""Stages on a native backbone (tiny Qwen2.5-VL + a BEATs audio branch) through the HF Trainer:
stage 1 trains only the new projectors, stage 2 projectors + MokA in the language model (+ the
native connector when asked); outputs hold only what trained and reload from the backbone path."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
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


@pytest.fixture(scope="module")
def connector_output(native_dirs, av_data, stage1_dir, tmp_path_factory):
    """A stage-2 output that trained the native connector."""
    out = tmp_path_factory.mktemp("native-connector-output")
    run_instruct(_config(native_dirs, av_data, out, "instruct", pretrained_projectors=stage1_dir,
                         train_native_connector=True))
    return str(out)


def test_a_loaded_trained_connector_is_kept_by_later_saves(connector_output, tmp_path):
    """Outputs saved from a loaded model (mllm export, a continued run) keep the trained connector,
    which no longer trains there; without it they would reload the released one."""
    from safetensors.torch import load_file

    model = MultimodalLM.from_pretrained(connector_output)
    assert not any(p.requires_grad for p in model.connector().parameters())
    model.save_pretrained(str(tmp_path / "again"))
    saved, again = (load_file(os.path.join(folder, "native_connector.safetensors"))
                    for folder in (connector_output, tmp_path / "again"))
    assert sorted(saved) == sorted(again) and all(torch.equal(saved[k], again[k]) for k in saved)


def test_music_avqa_suite_runs_on_the_native_backbone(connector_output, tmp_path):
    """The paper's Qwen2.5-VL row is evaluated on MUSIC-AVQA: native video + the BEATs audio branch
    through the eval runner, batched answers equal to one-by-one ones, and the trained connector
    part of the checkpoint's identity (an answer log of another connector is not resumed)."""
    import shutil

    from safetensors.torch import load_file, save_file

    from eval_suites.runner import checkpoint_identity, read_answer_log, run_suite
    from mllm.data.media import write_audio, write_video

    media = tmp_path / "media"
    items = []
    for k in range(3):
        video_id = f"{k + 1:08d}"
        frames = [np.random.RandomState(10 * k + f).randint(0, 255, (32, 40, 3), dtype=np.uint8)
                  for f in range(6 + 4 * k)]   # 1.5, 2.5 and 3.5 s
        write_video(media / "videos" / f"{video_id}.mp4", frames, fps=4)
        write_audio(media / "audios" / f"{video_id}.wav",
                    (0.3 * np.sin(np.arange(16000) * (0.02 + 0.01 * k))).astype(np.float32), 16000)
        items.append({"video_id": video_id, "question_id": k + 1, "type": '["Audio-Visual", "Counting"]',
                      "question_content": "How many instruments are sounding?", "templ_values": "[]",
                      "question_deleted": 0, "anser": "two"})
    annotations = tmp_path / "avqa-test.json"
    annotations.write_text(json.dumps(items))
    model = MultimodalLM.from_pretrained(connector_output)
    # No scoring mode: a random tiny model's answers parse as no MUSIC-AVQA answer (scoring does not
    # depend on the backbone; the suite's own tests cover it).
    kwargs = dict(media_root=str(media), max_new_tokens=4, progress=False, checkpoint=connector_output, modes=())
    run_suite("music_avqa", model, str(annotations), str(tmp_path / "batched"), batch_size=3, **kwargs)
    run_suite("music_avqa", model, str(annotations), str(tmp_path / "single"), batch_size=1, **kwargs)
    batched, single = (read_answer_log(str(tmp_path / run / "samples.jsonl")) for run in ("batched", "single"))
    assert len(batched) == 3 and batched == single and any(batched.values())

    identity = checkpoint_identity(model, connector_output)
    assert "native_connector.safetensors" in identity["files"]
    other = tmp_path / "other-connector"
    shutil.copytree(connector_output, other)
    connector = load_file(os.path.join(other, "native_connector.safetensors"))
    save_file({k: v + 0.1 for k, v in connector.items()}, os.path.join(other, "native_connector.safetensors"))
    assert checkpoint_identity(model, str(other))["sha256"] != identity["sha256"]
    # In memory too (a model built in this process): the connector is part of the weights hashed.
    in_memory = checkpoint_identity(MultimodalLM.from_pretrained(str(other)))
    assert checkpoint_identity(model)["sha256"] != in_memory["sha256"]
