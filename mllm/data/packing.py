"""Packed sequences (``data.packing``): several short samples in one row, none attending to another.

A row holds whole samples back to back, up to ``data.packed_length`` tokens, then padding. The
collator marks each token with its sample's place in the row (``segment_ids``: 0, 1, ... and -1 on
padding); the model turns that into position ids that restart at every sample, hands the LM no
padding mask (so transformers builds a block-diagonal causal mask, or flash-attention's varlen
lengths, from those positions: ``mllm.model.packing``) and publishes the segments to the tuner
layers, which keep their per-sample work (MokA's question keys, DeLo's routing) inside a segment.
Each sample's first label is dropped: it is the one the previous sample's last token would
otherwise learn to predict across the boundary (unpacked, the first label is never a target).

Rows are packed once, before training, by best-fit decreasing within shuffled windows of samples
(the seed decides the windows, so the rows are a function of the seed and the data alone); the
sampler then orders rows as it orders samples (random, or grouped by modality mix and length).
With grouping on, rows are packed within one modality mix, so a grouped batch stays one mix.
``per_device_train_batch_size`` then counts rows.
"""

from __future__ import annotations

import bisect
from collections.abc import Hashable, Sequence
from typing import Any

import torch

from mllm.data.dataset import NATIVE_MEDIA_KEYS
from mllm.data.templates import IGNORE_INDEX
from mllm.modality import MEDIA_INPUT_KEYS

#: Samples packed together per window: large enough that short samples fill the gaps that long ones
#: leave, small enough that rows mix samples from all over the (shuffled) data.
PACKING_WINDOW = 4096


def best_fit_decreasing(indices: Sequence[int], lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Pack ``indices`` into rows of at most ``capacity`` tokens: longest first, each into the row
    with the least room that still takes it (a new row if none does). A sample longer than
    ``capacity`` gets a row of its own. Ties keep the order of ``indices``; each row lists its
    samples in the order they were placed."""
    rows: list[list[int]] = []
    room: list[tuple[int, int]] = []   # (free tokens, row), sorted: the best fit is the first >= length
    for i in sorted(indices, key=lambda i: -lengths[i]):
        at = bisect.bisect_left(room, (lengths[i], -1))
        if at == len(room):
            rows.append([i])
            bisect.insort(room, (max(capacity - lengths[i], 0), len(rows) - 1))
            continue
        free, row = room.pop(at)
        rows[row].append(i)
        bisect.insort(room, (free - lengths[i], row))
    return rows


def pack_samples(lengths: Sequence[int], mixes: Sequence[Hashable], capacity: int, seed: int = 0,
                 by_mix: bool = False, window: int = PACKING_WINDOW) -> list[list[int]]:
    """Rows of sample indices (see the module docstring): the samples are shuffled with ``seed``,
    cut into windows of ``window`` samples and each window packed by best-fit decreasing; with
    ``by_mix`` each modality mix is shuffled and packed on its own."""
    if capacity < 1:
        raise ValueError(f"packed length must be >= 1, got {capacity}")
    generator = torch.Generator().manual_seed(seed)
    groups = ([[i for i, m in enumerate(mixes) if m == mix] for mix in sorted(set(mixes), key=repr)]
              if by_mix else [list(range(len(lengths)))])
    rows = []
    for members in groups:
        shuffled = [members[j] for j in torch.randperm(len(members), generator=generator).tolist()]
        for start in range(0, len(shuffled), window):
            rows += best_fit_decreasing(shuffled[start:start + window], lengths, capacity)
    return rows


class PackedDataset(torch.utils.data.Dataset):
    """A dataset's samples packed into rows: item ``i`` is the list of row ``i``'s samples, which
    :class:`PackedCollator` lays out in one row each."""

    def __init__(self, dataset, capacity: int, seed: int = 0, by_mix: bool = False):
        self.dataset = dataset
        self.capacity = capacity
        self.sample_lengths, self.sample_mixes = dataset.lengths_and_mixes()
        self.rows = pack_samples(self.sample_lengths, self.sample_mixes, capacity, seed=seed, by_mix=by_mix)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> list[dict[str, Any]]:
        return [self.dataset[i] for i in self.rows[index]]

    def lengths_and_mixes(self) -> tuple[list[int], list[tuple[str, ...]]]:
        """Each row's token count and modality mix (the union of its samples' media fields), for
        :class:`mllm.data.sampler.ModalityLengthGroupedSampler`."""
        lengths = [sum(self.sample_lengths[i] for i in row) for row in self.rows]
        mixes = [tuple(sorted({f for i in row for f in self.sample_mixes[i]})) for row in self.rows]
        return lengths, mixes

    def __getattr__(self, name: str):
        # Counts and reports of the wrapped dataset (num_skipped, skipped, media_skipped, ...).
        if name == "dataset":
            raise AttributeError(name)
        return getattr(self.dataset, name)


class PackedCollator:
    """Lays each item's samples (a list, from :class:`PackedDataset`) end to end in one row,
    right-padded to the longest row: ``input_ids``, ``labels`` (each sample's first label
    dropped), ``question_mask``, ``attention_mask`` (1 on the samples' tokens) and ``segment_ids``
    (each token's sample in its row, -1 on padding); media keys are concatenated in row, then
    sample order: the order in which the model fills the placeholder positions."""

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, rows: list[list[dict[str, Any]] | dict[str, Any]]) -> dict[str, torch.Tensor]:
        # A plain sample (the unpacked eval set shares the Trainer's collator) is a row of one.
        rows = [[row] if isinstance(row, dict) else row for row in rows]
        width = max(sum(len(s["input_ids"]) for s in row) for row in rows)
        shape = (len(rows), width)
        batch = {"input_ids": torch.full(shape, self.pad_token_id, dtype=torch.long),
                 "attention_mask": torch.zeros(shape, dtype=torch.long),
                 "question_mask": torch.zeros(shape, dtype=torch.bool),
                 "segment_ids": torch.full(shape, -1, dtype=torch.long)}
        with_labels = all("labels" in s for row in rows for s in row)
        if with_labels:
            batch["labels"] = torch.full(shape, IGNORE_INDEX, dtype=torch.long)
        for r, row in enumerate(rows):
            start = 0
            for slot, sample in enumerate(row):
                end = start + len(sample["input_ids"])
                batch["input_ids"][r, start:end] = sample["input_ids"]
                batch["attention_mask"][r, start:end] = 1
                batch["question_mask"][r, start:end] = sample["question_mask"]
                batch["segment_ids"][r, start:end] = slot
                if with_labels:
                    batch["labels"][r, start + 1:end] = sample["labels"][1:]
                start = end
        samples = [s for row in rows for s in row]
        for key in (*MEDIA_INPUT_KEYS.values(), *NATIVE_MEDIA_KEYS):
            items = [s[key] for s in samples if key in s]
            if items:
                batch[key] = torch.cat(items)
        return batch
