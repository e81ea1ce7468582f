"""RebQ's CMML benchmark files (UPMC-Food101-CMML, MM-IMDb-CMML) read into per-task splits, with
MMP-style missing tables (one per task and split, seeded, saved next to the run) and ViLT batches.

Layout (RebQ ``src/data/builder.py``): ``<root>/images/...`` and ``<root>/<Name>.json`` whose items
carry ``task_id``, ``split`` (train / val / test), ``image`` (relative to ``images/``), ``text``
(a string, or a list joined with ". ") and ``label`` (a global class id, or a multi-hot list). The
JSON files' top level was not inspected upstream; we accept a list of items or a mapping whose
values are lists of items.

Missing modalities as RebQ: a missing image becomes a white image of the same size, a missing text
the empty string; codes 0 complete / 1 text missing / 2 image missing (``mllm.classify.missing``).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Iterator, Optional

import numpy as np
import torch

from mllm.classify.missing import IMAGE_MISSING, TEXT_MISSING, MissingSpec, load_or_make_missing_table
from mllm.continual.cmml import CmmlBatch

#: benchmark -> (json file name, tasks, labels per task, multilabel)  (RebQ configs/data/*.yaml)
CMML_BENCHMARKS = {
    "food101_cmml": ("UPMC-Food101-CMML.json", 10, 10, False),
    "mmimdb_cmml": ("MM-IMDB-CMML.json", 5, 4, True),
}


@dataclass
class CmmlItem:
    task: int
    image: str        # absolute path
    text: str
    label: object     # int, or list of 0/1


def read_cmml(root: str, benchmark: str, split: str) -> list[list[CmmlItem]]:
    """Items of ``split`` grouped by task id (index = task)."""
    json_name, num_tasks, _, multilabel = CMML_BENCHMARKS[benchmark]
    path = os.path.join(root, json_name)
    with open(path) as f:
        raw = json.load(f)
    items = raw if isinstance(raw, list) else [item for value in raw.values() if isinstance(value, list)
                                               for item in value]
    tasks: list[list[CmmlItem]] = [[] for _ in range(num_tasks)]
    for n, item in enumerate(items):
        try:
            if item["split"] != split:
                continue
            task = int(item["task_id"])
            text = item["text"]
            text = ". ".join(text) if isinstance(text, list) else str(text)
            label = list(item["label"]) if multilabel else int(item["label"])
            tasks[task].append(CmmlItem(task, os.path.join(root, "images", item["image"]), text, label))
        except (KeyError, TypeError, ValueError, IndexError) as e:
            raise ValueError(f"{path}: item {n} is not a CMML item ({e!r}): {str(item)[:200]}") from None
    return tasks


class CmmlLoader:
    """Re-iterable batches of one task's split (shuffled per epoch in training)."""

    def __init__(self, items: list[CmmlItem], table: np.ndarray, processor, total_labels: int, multilabel: bool,
                 batch_size: int, max_text_len: int, shuffle: bool, seed: int = 0):
        self.items, self.table, self.processor = items, table, processor
        self.total_labels, self.multilabel = total_labels, multilabel
        self.batch_size, self.max_text_len, self.shuffle = batch_size, max_text_len, shuffle
        self.rng = np.random.default_rng(seed)

    def __len__(self) -> int:
        return (len(self.items) + self.batch_size - 1) // self.batch_size

    def __iter__(self) -> Iterator[CmmlBatch]:
        order = self.rng.permutation(len(self.items)) if self.shuffle else np.arange(len(self.items))
        for start in range(0, len(order), self.batch_size):
            yield self._batch(order[start:start + self.batch_size])

    def _batch(self, indices) -> CmmlBatch:
        from PIL import Image

        images, texts, labels, codes = [], [], [], []
        for i in indices:
            item, code = self.items[i], int(self.table[i])
            image = Image.open(item.image).convert("RGB")
            if code == IMAGE_MISSING:
                image = Image.new("RGB", image.size, (255, 255, 255))
            images.append(image)
            texts.append("" if code == TEXT_MISSING else item.text)
            codes.append(code)
            if self.multilabel:
                labels.append((list(item.label) + [0] * self.total_labels)[: self.total_labels])
            else:
                labels.append(item.label)
        inputs = self.processor(images=images, text=texts, padding="max_length", truncation=True,
                                max_length=self.max_text_len, return_tensors="pt")
        inputs = {k: v for k, v in inputs.items() if k in ("input_ids", "attention_mask", "token_type_ids",
                                                            "pixel_values", "pixel_mask")}
        label_tensor = torch.tensor(labels, dtype=torch.float32 if self.multilabel else torch.long)
        return CmmlBatch(inputs, label_tensor, torch.tensor(codes))


def task_loaders(root: str, benchmark: str, split: str, processor, spec: MissingSpec, table_dir: str,
                 batch_size: int, max_text_len: int, shuffle: bool, seed: int = 0,
                 num_tasks: Optional[int] = None) -> list[CmmlLoader]:
    """One loader per task (the first ``num_tasks``), each with its own saved missing table
    (``{benchmark}_task{t}_split{split}_...``, as RebQ names them)."""
    _, tasks_total, labels_per_task, multilabel = CMML_BENCHMARKS[benchmark]
    per_task = read_cmml(root, benchmark, split)[: num_tasks or tasks_total]
    loaders = []
    for t, items in enumerate(per_task):
        if not items:
            raise ValueError(f"{benchmark}: task {t} has no {split} items in {root}")
        # A different seed per task and split, so no two tables are the same draw.
        split_index = ("train", "val", "test").index(split) if split in ("train", "val", "test") else 3
        table_spec = MissingSpec(spec.ratio, spec.type, spec.both_ratio, spec.seed + 1000 * t + split_index)
        table = load_or_make_missing_table(
            os.path.join(table_dir, table_spec.file_name(f"{benchmark}_task{t}", split)), len(items), table_spec)
        loaders.append(CmmlLoader(items, table, processor, tasks_total * labels_per_task, multilabel, batch_size,
                                  max_text_len, shuffle, seed + t))
    return loaders
