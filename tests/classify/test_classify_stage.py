"""The classification stage end to end on generated Hateful-Memes-format data, every tuner."""

from __future__ import annotations

import json
import os

import pytest
import torch

import mllm  # noqa: F401
from mllm.classify.model import MissingModalityClassifier, prepare_clip_for_tuner
from mllm.classify.train import MissingModalityDataset, load_classify_config, run_classify
from mllm.tuners import CLIP, tuner_names
from tests.classify.helpers import write_memes, write_tiny_clip, write_tiny_tokenizer
from tests.tuners.mora_helpers import tiny_clip

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    base = tmp_path_factory.mktemp("classify")
    return {"clip": write_tiny_clip(str(base / "clip")), "tok": write_tiny_tokenizer(str(base / "tok")),
            "data": write_memes(str(base / "memes"))}


def _config(assets, out, tuner, **extra):
    overrides = [f"model.backbone={assets['clip']}", f"model.tokenizer={assets['tok']}", f"tuner.type={tuner}",
                 "data.dataset=hateful_memes", f"data.root={assets['data']}", "data.max_text_len=8",
                 f"training.output_dir={out}", "training.epochs=1", "training.batch_size=16", "training.device=cpu",
                 *[f"{k}={v}" for k, v in extra.items()]]
    return load_classify_config(os.path.join(ROOT, "configs/missing_modality/hateful_memes.yaml"), overrides)


@pytest.mark.parametrize("tuner", tuner_names(CLIP))
def test_each_tuner_trains_only_its_parameters(tuner):
    options = {"r": 4, "shared_r": 4, "dropout": 0.0} if tuner == "mora" else {"r": 4}
    model = MissingModalityClassifier(prepare_clip_for_tuner(tiny_clip(0), tuner, options), num_classes=2)
    names = {n for n, p in model.named_parameters() if p.requires_grad and not n.startswith("head.")}
    expected = {"mora": "mora_", "lora": "lora_", "dora": "lora_", "bitfit": ".bias"}
    if tuner == "frozen":
        assert not names
    elif tuner == "full":
        assert names == {n for n, _ in model.named_parameters() if not n.startswith("head.")}
    else:
        assert names and all(expected[tuner] in n for n in names), names
    if tuner in ("lora", "dora"):    # the same layers MoRA adapts: the last two of each tower
        assert {n.split(".encoder.layers.")[1].split(".")[0] for n in names if "vision" in n} == {"1", "2"}


def test_missing_fills(assets):
    from mllm.classify.datasets import read_split
    from mllm.classify.missing import IMAGE_MISSING, TEXT_MISSING
    from mllm.classify.train import CLIP_MEAN, CLIP_STD

    samples = read_split("hateful_memes", assets["data"], "train")[:3]
    table = torch.tensor([0, TEXT_MISSING, IMAGE_MISSING]).numpy()
    ones = MissingModalityDataset(samples, table, 16, "ones")
    white = MissingModalityDataset(samples, table, 16, "white")
    assert ones[1]["text"] == "" and ones[0]["text"] == samples[0].text
    assert torch.equal(ones[2]["pixel_values"], torch.ones(3, 16, 16))
    expected = (1 - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
    torch.testing.assert_close(white[2]["pixel_values"][:, 5, 5], expected)


def test_stage_runs_and_saves_a_repeatable_run(assets, tmp_path):
    results = run_classify(_config(assets, tmp_path / "mora", "mora"))
    assert results["test"]["metric"] == "auroc" and 0 <= results["test"]["value"] <= 1
    out = tmp_path / "mora"
    assert {"results.json", "trainable.safetensors", "adapter", "missing_tables"} <= set(os.listdir(out))
    tables = sorted(os.listdir(out / "missing_tables"))
    assert tables == [f"hateful_memes_{s}_missing_both_07_seed{i}.json" for i, s in ((2, "test"), (0, "train"),
                                                                                      (1, "val"))]
    # The same config repeats the run exactly (same tables, same seed).
    again = run_classify(_config(assets, tmp_path / "mora", "mora"))
    assert again["test"] == results["test"]
    saved = json.loads((out / "results.json").read_text())
    assert saved["config"]["data"]["test_missing"] == {"ratio": 0.7, "type": "both", "both_ratio": 0.5}
