"""The CMML stage end to end on a tiny generated benchmark in RebQ's file layout (local tiny ViLT
and processor, no downloads)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from mllm.continual.data import read_cmml
from mllm.continual.stage import load_cmml_config, run_cmml

WORDS = ["soup", "cake", "rice", "salad", "bread", "pie", "noodle", "curry"]


@pytest.fixture()
def tiny_backbone(tmp_path):
    from transformers import ViltProcessor

    from mllm.continual.tiny import TinyViltSizes, build_tiny_vilt

    path = build_tiny_vilt(str(tmp_path / "vilt"), WORDS, TinyViltSizes(hidden=16, layers=2, heads=2, image_size=16,
                                                                        patch_size=8, max_positions=16))
    # The words are in the vocabulary (not [UNK]), so the texts carry their signal.
    assert ViltProcessor.from_pretrained(path).tokenizer("soup cake").input_ids == [2, 5, 6, 3]
    return path


@pytest.fixture()
def tiny_food(tmp_path):
    from PIL import Image

    root = tmp_path / "UPMC-Food101-CMML"
    (root / "images").mkdir(parents=True)
    rng = np.random.default_rng(0)
    items = []
    for task in range(2):
        for split, n in (("train", 4), ("test", 4)):
            for k in range(n):
                name = f"t{task}_{split}_{k}.png"
                base = 220 if task == 0 else 30
                pixels = np.clip(base + rng.integers(-20, 20, (16, 16, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(root / "images" / name)
                words = WORDS[:4] if task == 0 else WORDS[4:]
                items.append({"task_id": task, "split": split, "image": name, "label": task * 10 + k % 2,
                              "text": [words[k % 4], words[(k + 1) % 4]]})
    (root / "UPMC-Food101-CMML.json").write_text(json.dumps(items))
    return str(root)


def test_reader_groups_items_by_task_and_joins_text_lists(tiny_food):
    tasks = read_cmml(tiny_food, "food101_cmml", "test")
    assert [len(t) for t in tasks[:2]] == [4, 4] and all(not t for t in tasks[2:])
    assert tasks[1][0].label == 10 and tasks[0][0].text == "soup. cake"


def test_cmml_stage_trains_two_tasks_and_writes_the_result_matrix(tiny_backbone, tiny_food, tmp_path):
    out = tmp_path / "run"
    cfg = load_cmml_config(None, [f"model.backbone={tiny_backbone}", f"data.root={tiny_food}", "data.num_tasks=2",
                                  "data.max_text_len=8", "tuner.r=2", "tuner.num_experts=4", "training.epochs=1",
                                  "training.lr=1e-2", f"training.output_dir={out}"])
    results = run_cmml(cfg)
    saved = json.loads((out / "results.json").read_text())
    assert saved["matrix"][0][1] is None and all(v is not None for v in saved["matrix"][1])
    assert all(math.isfinite(saved[k]) for k in ("average", "forgetting", "last"))
    assert results["metric"] == "accuracy" and results["missing"]["ratio"] == 0.7
    assert (out / "final" / "adapter_model.safetensors").exists()
    assert len(list((out / "missing_tables").iterdir())) == 4     # per task and split


def test_cmml_stage_runs_the_sequential_lora_baseline(tiny_backbone, tiny_food, tmp_path):
    out = tmp_path / "lora"
    cfg = load_cmml_config(None, [f"model.backbone={tiny_backbone}", f"data.root={tiny_food}", "data.num_tasks=2",
                                  "data.max_text_len=8", "tuner.type=lora", "tuner.r=2", "training.epochs=1",
                                  "training.lr=1e-2", f"training.output_dir={out}"])
    results = run_cmml(cfg)
    assert results["tuner"] == "lora" and all(math.isfinite(results[k]) for k in ("average", "forgetting", "last"))
    assert (out / "final" / "adapter_model.safetensors").exists()
    with pytest.raises(Exception, match="not used by the lora baseline"):
        run_cmml(load_cmml_config(None, [f"model.backbone={tiny_backbone}", f"data.root={tiny_food}",
                                         "tuner.type=lora", "tuner.query_dim=4", f"training.output_dir={out}"]))


def test_generated_cmml_tasks_are_read_per_task(tmp_path):
    from mllm.data.synthetic_missing import CMML_TASK_WORDS, write_cmml_tasks

    root = write_cmml_tasks(str(tmp_path / "cmml"), "SYNTHETIC-CMML.json", num_tasks=3, n_train=8, n_test=4,
                            image_size=16)
    tasks = read_cmml(root, "synthetic_cmml", "train")
    assert [len(t) for t in tasks[:3]] == [8, 8, 8] and not any(tasks[3:])
    for t, items in enumerate(tasks[:3]):
        assert sorted({item.label for item in items}) == [4 * t + c for c in range(4)]
        for item in items:
            assert CMML_TASK_WORDS[t][item.label % 2] in item.text.split()
