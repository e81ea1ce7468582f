"""Length-grouped batches per modality mix: every sample once, one mix per batch, less padding,
an order fixed by seed and epoch, and a resumed run that sees the uninterrupted run's batches."""

from __future__ import annotations

import random

import pytest

from mllm.data.sampler import ModalityLengthGroupedSampler, padding_fraction
from mllm.train.stages import run_instruct
from tests.train.test_stages import _config, assert_same_trained_weights, stage1_dir  # noqa: F401


def _mixed(n=203, seed=0):
    rng = random.Random(seed)
    mixes = [rng.choice([(), ("image",), ("audio", "image")]) for _ in range(n)]
    lengths = [rng.randint(10, 60) + (200 if mix else 0) for mix in mixes]
    return lengths, mixes


def test_batches_hold_one_mix_and_similar_lengths():
    lengths, mixes = _mixed()
    sampler = ModalityLengthGroupedSampler(lengths, mixes, batch_size=8, seed=3, megabatch_batches=4)
    batches = sampler.batches()
    order = list(sampler)
    assert sorted(order) == list(range(len(lengths)))                       # every sample exactly once
    assert [i for b in batches for i in b] == order
    assert all(len(b) == 8 for b in batches[:-1])                           # DataLoader cuts fall on batches
    per_mix = {mix: mixes.count(mix) for mix in set(mixes)}
    mixed_batches = [b for b in batches if len({mixes[i] for i in b}) > 1]
    # Only the pooled remainders (fewer than 8 per mix) can share a batch.
    assert sum(len(b) for b in mixed_batches) <= sum(count % 8 for count in per_mix.values())
    rng = random.Random(0)
    shuffled = list(range(len(lengths)))
    rng.shuffle(shuffled)
    random_batches = [shuffled[k:k + 8] for k in range(0, len(shuffled), 8)]
    assert padding_fraction(batches, lengths) < 0.5 * padding_fraction(random_batches, lengths)


def test_order_is_fixed_by_seed_and_epoch():
    lengths, mixes = _mixed()
    a = ModalityLengthGroupedSampler(lengths, mixes, batch_size=4, seed=1)
    b = ModalityLengthGroupedSampler(lengths, mixes, batch_size=4, seed=1)
    assert list(a) == list(b)
    a.set_epoch(1)
    assert list(a) != list(b)
    b.set_epoch(1)
    assert list(a) == list(b)
    assert list(ModalityLengthGroupedSampler(lengths, mixes, batch_size=4, seed=2)) != list(b)
    with pytest.raises(ValueError, match="lengths for"):
        ModalityLengthGroupedSampler(lengths[:-1], mixes, batch_size=4)


def test_grouped_training_resumes_to_the_same_weights(tiny_assets, demo_data, stage1_dir, tmp_path,  # noqa: F811
                                                      monkeypatch):
    used = []
    batches = ModalityLengthGroupedSampler.batches
    monkeypatch.setattr(ModalityLengthGroupedSampler, "batches", lambda self: used.append(self) or batches(self))
    cfg = _config(tiny_assets, demo_data, tmp_path, "instruct", pretrained_projectors=stage1_dir, max_steps=4,
                  save_steps=2, per_device_train_batch_size=4, train_sampling_strategy="random",
                  group_by_modality_length=True)
    straight = run_instruct(cfg)
    assert used, "the trainer did not use the grouped sampler"
    cfg.training["resume_from_checkpoint"] = str(tmp_path / "checkpoint-2")
    resumed = run_instruct(cfg)
    assert_same_trained_weights(resumed, straight)
