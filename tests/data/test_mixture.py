"""``data.train`` naming native sources and mixtures: counts, reproducibility, config parsing,
and a stage-1 run that trains from one."""

from __future__ import annotations

import json
import os

import pytest

from mllm.config import ConfigError, config_from_dict, load_config
from mllm.data.mixture import build_mixture, draw, materialise, parse_sources
from tests.conftest import model_section


def _llava_file(path, prefix, n):
    with open(path, "w") as f:
        for i in range(n):
            f.write(json.dumps({"id": f"{prefix}{i}", "image": f"{prefix}/{i}.png", "conversations": [
                {"from": "human", "value": "<image>\nDescribe."}, {"from": "gpt", "value": f"{prefix} {i}"}]}) + "\n")
    return str(path)


@pytest.fixture
def two_sources(tmp_path):
    return _llava_file(tmp_path / "a.jsonl", "a", 20), _llava_file(tmp_path / "b.jsonl", "b", 5)


def test_counts_ratios_replacement_and_media_roots(two_sources, tmp_path):
    a, b = two_sources
    value = [{"type": "llava", "path": a, "media_root": str(tmp_path / "ma"), "count": 7, "seed": 3},
             {"type": "llava", "path": b, "media_root": str(tmp_path / "mb"), "ratio": 2.0, "replace": True, "seed": 1}]
    records, summary = build_mixture(value)
    assert [(row["drawn"], row["records"]) for row in summary] == [(7, 20), (10, 5)]
    ids = [r["id"] for r in records]
    assert sum(i.startswith("a") for i in ids) == 7 and len(set(i for i in ids if i.startswith("a"))) == 7
    assert sum(i.startswith("b") for i in ids) == 10 and summary[1]["unique"] <= 5
    # Each source's media resolve against its own root; the native place is kept.
    assert records[0]["image"] == os.path.join(str(tmp_path / "ma"), "a", records[0]["id"][1:] + ".png")
    assert records[-1]["image"].startswith(str(tmp_path / "mb"))
    assert records[0]["source"].startswith(f"{a}:")
    # Same config, same records; another seed, another draw.
    assert build_mixture(value)[0] == records
    reseeded = build_mixture([{**value[0], "seed": 4}, value[1]])[0]
    assert [r["id"] for r in reseeded] != ids
    # No count: every record, in file order.
    assert [r["id"] for r in build_mixture({"type": "llava", "path": b})[0]] == [f"b{i}" for i in range(5)]


def test_draw_without_replacement_never_repeats_and_refuses_too_many():
    spec = parse_sources({"type": "llava", "path": "x", "count": 5, "seed": 0})[0]
    picked = draw(spec, 5)
    assert sorted(picked) == list(range(5))
    with pytest.raises(ValueError, match="count 5 is more than its 4 records; set replace: true"):
        draw(spec, 4)


@pytest.mark.parametrize("value, message", [
    ({"type": "nope", "path": "x"}, "unknown data source type 'nope'"),
    ({"type": "clotho", "path": "x", "colour": 1}, "has no option 'colour'"),
    ([{"type": "llava", "path": "x", "count": 2, "ratio": 0.5}], r"data.train\[0\]: give count or ratio"),
    ({"type": "llava", "path": "x", "ratio": 1.5}, "set replace: true"),
    ({"type": "llava"}, "needs 'type' and 'path'"),
    ({"type": "llava", "path": "x", "count": 0}, "count must be a positive integer"),
])
def test_bad_mixture_fields_are_config_errors_naming_the_field(value, message):
    with pytest.raises(ConfigError, match=message):
        config_from_dict({"data": {"train": value}})


def test_relative_paths_in_sources_resolve_against_the_yaml(tmp_path):
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "x.yaml").write_text(
        "data:\n  train:\n    - {type: ave_moka, path: ./AVE_data/train_samples_ave.json, media_root: ./AVE_data}\n"
        "    - ./more.jsonl\n")
    cfg = load_config(str(tmp_path / "cfg" / "x.yaml"))
    assert cfg.data.train[0]["path"] == str(tmp_path / "cfg" / "AVE_data" / "train_samples_ave.json")
    assert cfg.data.train[0]["media_root"] == str(tmp_path / "cfg" / "AVE_data")
    assert cfg.data.train[1] == str(tmp_path / "cfg" / "more.jsonl")


def test_materialised_mixture_logs_and_saves_per_source_counts(two_sources, tmp_path, caplog):
    a, b = two_sources
    out = str(tmp_path / "run" / "data" / "train.jsonl")
    with caplog.at_level("INFO", logger="mllm.data.mixture"):
        materialise([{"type": "llava", "path": a, "count": 3}, {"type": "llava", "path": b}], out)
    assert "8 records from 2 source(s)" in caplog.text and "3 of       20" in caplog.text
    with open(out + ".sources.json") as f:
        assert [row["drawn"] for row in json.load(f)] == [3, 5]
    with open(out) as f:
        assert len(f.readlines()) == 8


def test_stage1_trains_from_a_source_mixture(tiny_assets, demo_data, tmp_path):
    from mllm.train.stages import run_pretrain

    cfg = config_from_dict({
        "model": model_section(tiny_assets),
        "data": {"train": [{"type": "llava_pretrain", "path": demo_data["pretrain"], "count": 6, "seed": 0,
                            "media_root": demo_data["media_root"]},
                           {"type": "llava", "path": demo_data["pretrain"], "count": 2, "seed": 1,
                            "media_root": demo_data["media_root"]}],
                 "template": "plain"},
        "tuner": {"type": "none"},
        "training": {"output_dir": str(tmp_path / "run"), "max_steps": 1, "per_device_train_batch_size": 4,
                     "use_cpu": True, "disable_tqdm": True, "save_strategy": "no", "report_to": []},
    })
    run_pretrain(cfg)
    with open(tmp_path / "run" / "data" / "train.jsonl") as f:
        assert len(f.readlines()) == 8
    assert os.path.isfile(tmp_path / "run" / "projectors.safetensors")
