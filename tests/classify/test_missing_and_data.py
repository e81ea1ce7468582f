"""Missing tables (exact ratios, reproducible, saved), dataset readers (native layouts, errors
naming file and line) and the benchmark metrics checked against scikit-learn."""

from __future__ import annotations

import json

import numpy as np
import pytest

from mllm.classify.datasets import MMIMDB_GENRES, DatasetFormatError, read_split
from mllm.classify.missing import (
    COMPLETE,
    IMAGE_MISSING,
    TEXT_MISSING,
    MissingSpec,
    load_or_make_missing_table,
    make_missing_table,
)
from mllm.metrics.classification import accuracy, auroc, f1_macro, score, softmax_positive


# -- missing tables ----------------------------------------------------------------------------------
@pytest.mark.parametrize("n, ratio, kind", [(1000, 0.7, "both"), (997, 0.3, "text"), (101, 0.9, "image"),
                                            (10, 0.0, "both"), (64, 1.0, "both")])
def test_missing_tables_have_exactly_the_configured_ratios(n, ratio, kind):
    table = make_missing_table(n, MissingSpec(ratio=ratio, type=kind, both_ratio=0.5, seed=3))
    missing = int(n * ratio)
    counts = {code: int((table == code).sum()) for code in (COMPLETE, TEXT_MISSING, IMAGE_MISSING)}
    assert counts[COMPLETE] == n - missing
    if kind == "text":
        assert counts == {COMPLETE: n - missing, TEXT_MISSING: missing, IMAGE_MISSING: 0}
    elif kind == "image":
        assert counts == {COMPLETE: n - missing, TEXT_MISSING: 0, IMAGE_MISSING: missing}
    else:
        assert counts[IMAGE_MISSING] == int(missing * 0.5)
        assert counts[TEXT_MISSING] == missing - int(missing * 0.5)


def test_missing_tables_are_reproducible_from_the_seed_and_saved(tmp_path):
    spec = MissingSpec(ratio=0.7, type="both", seed=11)
    assert np.array_equal(make_missing_table(500, spec), make_missing_table(500, spec))
    assert not np.array_equal(make_missing_table(500, spec), make_missing_table(500, MissingSpec(0.7, "both", 0.5, 12)))
    path = tmp_path / spec.file_name("food101", "train")
    first = load_or_make_missing_table(str(path), 500, spec)
    saved = json.loads(path.read_text())
    assert saved["spec"] == {"ratio": 0.7, "type": "both", "both_ratio": 0.5, "seed": 11}
    assert np.array_equal(load_or_make_missing_table(str(path), 500, spec), first)
    with pytest.raises(ValueError, match="saved missing table"):
        load_or_make_missing_table(str(path), 500, MissingSpec(ratio=0.5, seed=11))
    with pytest.raises(ValueError, match="missing type"):
        MissingSpec(type="audio")


# -- metrics vs scikit-learn ---------------------------------------------------------------------------
def test_metrics_agree_with_scikit_learn():
    from sklearn.metrics import accuracy_score, f1_score, roc_auc_score

    rng = np.random.default_rng(0)
    logits = rng.normal(size=(200, 23))
    labels = (rng.random((200, 23)) < 0.2).astype(int)
    labels[:, 5] = 0
    logits[:, 5] = -1.0          # a genre with no positives and no predictions
    expected = f1_score(labels, (logits > 0).astype(int), average="macro", zero_division=0)
    assert f1_macro(logits, labels) == pytest.approx(expected, abs=1e-12)

    logits = rng.normal(size=(300, 101))
    labels = rng.integers(0, 101, 300)
    assert accuracy(logits, labels) == pytest.approx(accuracy_score(labels, logits.argmax(-1)))

    logits = np.round(rng.normal(size=(250, 2)), 1)   # rounding creates tied scores
    labels = rng.integers(0, 2, 250)
    probs = softmax_positive(logits)
    assert auroc(probs, labels) == pytest.approx(roc_auc_score(labels, probs), abs=1e-12)
    assert score("hateful_memes", logits, labels)["metric"] == "auroc"
    with pytest.raises(ValueError, match="both positive and negative"):
        auroc([0.1, 0.2], [1, 1])


# -- datasets -------------------------------------------------------------------------------------------
def _write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_readers_parse_the_native_layouts(tmp_path):
    imdb = tmp_path / "mmimdb"
    _write(imdb / "split.json", json.dumps({"train": ["0001", "0002"], "dev": [], "test": []}))
    _write(imdb / "labels" / "0001.json", json.dumps({"plot": ["a", "b"], "genres": ["Drama", "Sport", "Talk"]}))
    _write(imdb / "labels" / "0002.json", json.dumps({"plot": ["c"], "genres": ["Film-Noir"]}))
    samples = read_split("mmimdb", str(imdb), "train")
    assert [(s.text, s.group) for s in samples] == [("a", 0), ("b", 0), ("c", 1)]
    assert samples[0].label[MMIMDB_GENRES.index("Sport")] == 1 and sum(samples[0].label) == 2
    assert samples[0].image.endswith("images/0001.jpeg")

    food = tmp_path / "food"
    _write(food / "split.json", json.dumps({"train": ["apple_pie_1.jpg", "ramen_2.jpg"], "val": ["ramen_3.jpg"],
                                            "test": []}))
    _write(food / "class_idx.json", json.dumps({"apple_pie": 0, "ramen": 100}))
    _write(food / "text.json", json.dumps({"apple_pie_1.jpg": "pie", "ramen_3.jpg": "noodles"}))
    train = read_split("food101", str(food), "train")
    assert [(s.text, s.label) for s in train] == [("pie", 0)]          # ramen_2 has no text: skipped
    assert read_split("food101", str(food), "val")[0].image.endswith("images/train/ramen/ramen_3.jpg")

    memes = tmp_path / "memes"
    _write(memes / "dev.jsonl", '{"id": 1, "img": "img/01.png", "label": 1, "text": "hi"}\n\n'
                                '{"id": 2, "img": "img/02.png", "label": 0, "text": "yo"}\n')
    assert [(s.text, s.label) for s in read_split("hateful_memes", str(memes), "val")] == [("hi", 1), ("yo", 0)]


@pytest.mark.parametrize("dataset, files, split, where, message", [
    ("hateful_memes", {"train.jsonl": '{"img": "a.png", "label": 0, "text": "x"}\n{"img": "b.png", "label": 0\n'},
     "train", "train.jsonl:2", "invalid JSON"),
    ("hateful_memes", {"train.jsonl": '{"img": "a.png", "label": 0, "text": "x"}\n\n{"img": "b.png", "text": "y"}\n'},
     "train", "train.jsonl:3", "missing field"),
    ("hateful_memes", {"dev.jsonl": '{"img": "a.png", "label": 2, "text": "x"}\n'}, "val", "dev.jsonl:1",
     "label must be 0 or 1"),
    ("mmimdb", {"split.json": '{\n "train": [\n  "0001",\n  "0009"\n ]\n}',
                "labels/0001.json": '{"plot": [], "genres": []}'},
     "train", "split.json:4", "no label file"),
    ("mmimdb", {"split.json": '{"train": ["0001"]}', "labels/0001.json": '{\n "plot": "one",\n "genres": []\n}'},
     "train", "0001.json:2", "'plot' must be a list"),
    ("mmimdb", {"split.json": '{"train": ["0001"]}', "labels/0001.json": '{\n "plot": [,\n}'},
     "train", "0001.json:2", "invalid JSON"),
    ("food101", {"split.json": '{"train": [\n "pie_1.jpg",\n "soup_2.jpg"]}', "class_idx.json": '{"pie": 0}',
                 "text.json": "{}"}, "train", "split.json:3", "class 'soup'"),
])
def test_bad_dataset_files_give_errors_naming_file_and_line(tmp_path, dataset, files, split, where, message):
    for name, text in files.items():
        _write(tmp_path / name, text)
    with pytest.raises(DatasetFormatError, match=message) as caught:
        read_split(dataset, str(tmp_path), split)
    assert str(caught.value).split(": ")[0].endswith(where)
