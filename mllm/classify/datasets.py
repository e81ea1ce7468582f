"""The three missing-modality benchmarks, read in their native (MMP ``DATA.md``) layouts.

* MM-IMDb: ``split.json`` ({train, dev, test} id lists), ``labels/<id>.json`` (``plot``: list of
  strings, ``genres``: list), ``images/<id>.jpeg``. Each (image, plot) pair is one sample; the
  missing table is per movie (as the MoRA reference does), so a movie's plots share its code.
* UPMC-Food101: ``class_idx.json`` (class -> index), ``text.json`` (file name -> title),
  ``split.json`` ({train, val, test} file-name lists), ``images/{train,test}/<class>/<file>``
  (val images live in the train folder). Label = class_idx[name up to its last '_']; samples
  without a title are skipped (MMP does the same).
* Hateful Memes: ``{train,dev,test}.jsonl``, one ``{id, img, label, text}`` object per line,
  ``img`` relative to the dataset root.

Every malformed file raises ``DatasetFormatError`` whose message starts with ``file:line``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

from mllm.errors import UserError

#: MM-IMDb genre order of MMP's ``write_mmimdb.py`` (the 23 genres the benchmark scores).
MMIMDB_GENRES = ("Drama", "Comedy", "Romance", "Thriller", "Crime", "Action", "Adventure", "Horror", "Documentary",
                 "Mystery", "Sci-Fi", "Fantasy", "Family", "Biography", "War", "History", "Music", "Animation",
                 "Musical", "Western", "Sport", "Short", "Film-Noir")

#: split names as each benchmark spells them
SPLIT_NAMES = {"mmimdb": {"train": "train", "val": "dev", "test": "test"},
               "food101": {"train": "train", "val": "val", "test": "test"},
               "hateful_memes": {"train": "train", "val": "dev", "test": "test"}}

NUM_CLASSES = {"mmimdb": len(MMIMDB_GENRES), "food101": 101, "hateful_memes": 2}


class DatasetFormatError(UserError):
    """A malformed dataset file; the message starts with ``file:line``."""

    def __init__(self, path: str, line: int, message: str):
        super().__init__(f"{path}:{line}: {message}")
        self.path, self.line = path, line


@dataclass
class Sample:
    image: str                  # image file path
    text: str
    label: Any                  # int class, or a multi-hot list (MM-IMDb)
    group: int                  # index into the missing table (per movie for MM-IMDb)


def _read_json(path: str) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        raise DatasetFormatError(path, 0, "file not found") from None
    try:
        return json.loads(text), text
    except json.JSONDecodeError as e:
        raise DatasetFormatError(path, e.lineno, f"invalid JSON ({e.msg})") from None


def _line_of(text: str, needle: str) -> int:
    """1-based line of the first occurrence of ``needle`` in ``text`` (1 if absent)."""
    index = text.find(needle)
    return text.count("\n", 0, index) + 1 if index >= 0 else 1


def _split_ids(root: str, dataset: str, split: str) -> tuple[list, str, str]:
    path = os.path.join(root, "split.json")
    splits, text = _read_json(path)
    name = SPLIT_NAMES[dataset][split]
    if not isinstance(splits, dict) or name not in splits or not isinstance(splits[name], list):
        raise DatasetFormatError(path, 1, f"expected an object with a list {name!r} ({dataset} split names: "
                                          f"{sorted(SPLIT_NAMES[dataset].values())})")
    return splits[name], text, path


def read_mmimdb(root: str, split: str) -> list[Sample]:
    ids, split_text, split_path = _split_ids(root, "mmimdb", split)
    genre_index = {g: i for i, g in enumerate(MMIMDB_GENRES)}
    samples = []
    for group, movie in enumerate(ids):
        path = os.path.join(root, "labels", f"{movie}.json")
        if not os.path.exists(path):
            raise DatasetFormatError(split_path, _line_of(split_text, f'"{movie}"'),
                                     f"movie {movie!r} has no label file {path}")
        record, text = _read_json(path)
        if not isinstance(record, dict):
            raise DatasetFormatError(path, 1, "expected a JSON object")
        for key in ("plot", "genres"):
            if not isinstance(record.get(key), list):
                raise DatasetFormatError(path, _line_of(text, f'"{key}"'), f"{key!r} must be a list")
        label = [0] * len(MMIMDB_GENRES)
        for genre in record["genres"]:
            if genre in genre_index:        # genres outside the 23 are not scored (MMP drops them)
                label[genre_index[genre]] = 1
        image = os.path.join(root, "images", f"{movie}.jpeg")
        for plot in record["plot"]:
            if not isinstance(plot, str):
                raise DatasetFormatError(path, _line_of(text, '"plot"'), "every plot must be a string")
            samples.append(Sample(image, plot, label, group))
    return samples


def read_food101(root: str, split: str) -> list[Sample]:
    files, split_text, split_path = _split_ids(root, "food101", split)
    class_path, titles_path = os.path.join(root, "class_idx.json"), os.path.join(root, "text.json")
    class_idx, class_text = _read_json(class_path)
    titles, _ = _read_json(titles_path)
    for path, value in ((class_path, class_idx), (titles_path, titles)):
        if not isinstance(value, dict):
            raise DatasetFormatError(path, 1, "expected a JSON object")
    folder = "test" if split == "test" else "train"    # val images live in the train folder
    samples = []
    for name in files:
        if "_" not in str(name):
            raise DatasetFormatError(split_path, _line_of(split_text, f'"{name}"'),
                                     f"file name {name!r} is not <class>_<n>.jpg")
        cls = name[: name.rindex("_")]
        if cls not in class_idx:
            raise DatasetFormatError(split_path, _line_of(split_text, f'"{name}"'),
                                     f"class {cls!r} of {name!r} is not in {class_path}")
        if name not in titles:
            continue   # MMP skips samples without text
        label = class_idx[cls]
        if not isinstance(label, int) or not 0 <= label < NUM_CLASSES["food101"]:
            raise DatasetFormatError(class_path, _line_of(class_text, f'"{cls}"'),
                                     f"class index {label!r} must be an int in 0..100")
        samples.append(Sample(os.path.join(root, "images", folder, cls, name), str(titles[name]), label,
                              len(samples)))
    return samples


def read_hateful_memes(root: str, split: str) -> list[Sample]:
    path = os.path.join(root, f"{SPLIT_NAMES['hateful_memes'][split]}.jsonl")
    if not os.path.exists(path):
        raise DatasetFormatError(path, 0, "file not found (the labelled test set is test_seen.jsonl renamed "
                                          "to test.jsonl)")
    samples = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DatasetFormatError(path, number, f"invalid JSON ({e.msg})") from None
            missing = [k for k in ("img", "label", "text") if k not in record] if isinstance(record, dict) else ["*"]
            if missing:
                raise DatasetFormatError(path, number, f"missing field(s) {missing} (expected id, img, label, text)")
            if record["label"] not in (0, 1):
                raise DatasetFormatError(path, number, f"label must be 0 or 1, got {record['label']!r}")
            samples.append(Sample(os.path.join(root, record["img"]), str(record["text"]), int(record["label"]),
                                  len(samples)))
    return samples


READERS = {"mmimdb": read_mmimdb, "food101": read_food101, "hateful_memes": read_hateful_memes}


def read_split(dataset: str, root: str, split: str) -> list[Sample]:
    if dataset not in READERS:
        raise ValueError(f"unknown dataset {dataset!r}; expected one of {sorted(READERS)}")
    if split not in ("train", "val", "test"):
        raise ValueError(f"split must be train, val or test, got {split!r}")
    return READERS[dataset](root, split)
