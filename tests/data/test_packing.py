"""Packing samples into rows: every sample once, rows within the packed length, little padding,
rows fixed by the seed, grouped batches of one modality mix, and a packed stage 2 that trains and
resumes to the same weights."""

from __future__ import annotations

import random

import pytest
import torch

from mllm.config import ConfigError, config_from_dict
from mllm.data.packing import PackedCollator, PackedDataset, best_fit_decreasing, pack_samples
from mllm.data.sampler import ModalityLengthGroupedSampler, padding_fraction
from mllm.train.stages import run_instruct
from tests.train.test_stages import _config, assert_same_trained_weights, stage1_dir  # noqa: F401


def _mixed(n=400, seed=0):
    rng = random.Random(seed)
    mixes = [rng.choice([(), ("image",), ("audio", "image")]) for _ in range(n)]
    lengths = [rng.randint(10, 120) + {(): 0, ("image",): 64, ("audio", "image"): 160}[mix] for mix in mixes]
    return lengths, mixes


class _Lengths:
    """The two things PackedDataset reads from a dataset: samples and their lengths and mixes."""

    def __init__(self, lengths, mixes):
        self.lengths, self.mixes = lengths, mixes

    def lengths_and_mixes(self):
        return self.lengths, self.mixes

    def __getitem__(self, i):
        return {"input_ids": torch.full((self.lengths[i],), i), "labels": torch.full((self.lengths[i],), i),
                "question_mask": torch.zeros(self.lengths[i], dtype=torch.bool)}


def test_best_fit_decreasing_fills_rows_and_keeps_every_sample_once():
    lengths = [7, 3, 5, 2, 9, 4, 1, 12]
    rows = best_fit_decreasing(range(len(lengths)), lengths, capacity=10)
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
    assert [row for row in rows if sum(lengths[i] for i in row) > 10] == [[7]]   # too long: a row of its own
    # Longest first, each into the fullest row that takes it: 9 + 1, 7 + 3, 5 + 4, then 2 alone.
    assert rows == [[7], [4, 6], [0, 1], [2, 5], [3]]
    with pytest.raises(ValueError, match="packed length"):
        pack_samples(lengths, [()] * len(lengths), capacity=0)


def test_rows_are_fixed_by_the_seed_and_grouped_rows_hold_one_mix():
    lengths, mixes = _mixed()
    rows = pack_samples(lengths, mixes, capacity=512, seed=1)
    assert rows == pack_samples(lengths, mixes, capacity=512, seed=1)
    assert rows != pack_samples(lengths, mixes, capacity=512, seed=2)
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in row) <= 512 for row in rows)
    by_mix = pack_samples(lengths, mixes, capacity=512, seed=1, by_mix=True)
    assert sorted(i for row in by_mix for i in row) == list(range(len(lengths)))
    assert all(len({mixes[i] for i in row}) == 1 for row in by_mix)
    assert len({len({mixes[i] for i in row}) for row in rows}) > 1   # ungrouped rows mix modalities


def test_packed_batches_pad_far_less_than_random_and_grouped_ones():
    lengths, mixes = _mixed()
    order = list(range(len(lengths)))
    random.Random(0).shuffle(order)
    random_batches = [order[k:k + 8] for k in range(0, len(order), 8)]
    grouped = ModalityLengthGroupedSampler(lengths, mixes, 8, seed=0).batches()
    packed = PackedDataset(_Lengths(lengths, mixes), capacity=512, seed=0, by_mix=True)
    row_lengths, row_mixes = packed.lengths_and_mixes()
    row_batches = ModalityLengthGroupedSampler(row_lengths, row_mixes, 2, seed=0).batches()
    assert all(len({row_mixes[r] for r in batch}) == 1 for batch in row_batches[:-1])
    assert padding_fraction(row_batches, row_lengths) < 0.02
    assert padding_fraction(row_batches, row_lengths) < padding_fraction(grouped, lengths) \
        < padding_fraction(random_batches, lengths)


def test_packed_dataset_items_are_its_rows_samples_and_the_collator_takes_plain_samples():
    lengths, mixes = [5, 3, 4], [(), (), ()]
    packed = PackedDataset(_Lengths(lengths, mixes), capacity=8, seed=0)
    assert len(packed) == 2 and [[int(s["input_ids"][0]) for s in packed[r]] for r in range(2)] == packed.rows
    batch = PackedCollator(pad_token_id=99)([_Lengths(lengths, mixes)[0], _Lengths(lengths, mixes)[1]])
    assert batch["segment_ids"].tolist() == [[0] * 5, [0, 0, 0, -1, -1]]   # an unpacked eval batch
    assert batch["input_ids"][1].tolist() == [1, 1, 1, 99, 99]


def test_packed_stage2_trains_and_resumes_to_the_same_weights(tiny_assets, demo_data, stage1_dir, tmp_path,  # noqa: F811
                                                              monkeypatch):
    seen = []
    original = PackedCollator.__call__
    monkeypatch.setattr(PackedCollator, "__call__", lambda self, rows: seen.append(len(rows)) or original(self, rows))
    cfg = _config(tiny_assets, demo_data, tmp_path, "instruct", pretrained_projectors=stage1_dir, max_steps=4,
                  save_steps=2, per_device_train_batch_size=2, group_by_modality_length=True)
    cfg.data.packing, cfg.data.packed_length = True, 256
    straight = run_instruct(cfg)
    assert seen and set(seen) == {2}   # batches of two packed rows
    cfg.training["resume_from_checkpoint"] = str(tmp_path / "checkpoint-2")
    resumed = run_instruct(cfg)
    assert_same_trained_weights(resumed, straight)


def test_packed_length_must_be_positive():
    with pytest.raises(ConfigError, match="packed_length"):
        config_from_dict({"data": {"packing": True, "packed_length": 0}})
