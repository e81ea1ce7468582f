"""Batches of similar length within one modality mix (LLaVA's ``group_by_modality_length``).

A random order pads every batch to its longest sample, and a batch that mixes image questions with
text-only ones pads the text rows to the image rows' length. Grouping keeps each batch inside one
modality mix (the set of media fields a record has) and, within it, puts samples of similar
length together, while the order of the batches stays random.

The order is a function of the seed and the epoch alone, so a run resumed from a checkpoint (the
Trainer skips the batches already seen in the epoch) sees exactly the batches that the
uninterrupted run would have seen.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterator, Sequence

import torch


class ModalityLengthGroupedSampler(torch.utils.data.Sampler[int]):
    """Yields sample indices so that each run of ``batch_size`` consecutive indices is one batch of a
    single modality mix with similar lengths.

    ``batch_size`` is the number of samples that one optimizer step's forward passes draw across all
    processes (per-device batch x processes), so each process's slice comes from the same group.
    Samples are shuffled within their mix, cut into megabatches of ``megabatch_batches`` batches,
    and each megabatch is sorted by length before it is cut into batches. A mix whose count is not a
    multiple of ``batch_size`` leaves a remainder; the remainders of all mixes are sorted by length
    into batches of their own (the only batches that mix modalities), and the last, possibly short,
    batch comes last so that every other batch boundary falls where the DataLoader cuts.
    """

    def __init__(self, lengths: Sequence[int], mixes: Sequence[Hashable], batch_size: int, seed: int = 0,
                 megabatch_batches: int = 50):
        if len(lengths) != len(mixes):
            raise ValueError(f"{len(lengths)} lengths for {len(mixes)} modality mixes")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.lengths = list(lengths)
        self.mixes = list(mixes)
        self.batch_size = batch_size
        self.seed = seed
        self.megabatch = batch_size * max(1, megabatch_batches)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Called by the Trainer's DataLoader each epoch: a new order, still determined by the seed."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def batches(self) -> list[list[int]]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        by_longest = lambda indices: sorted(indices, key=lambda i: -self.lengths[i])  # noqa: E731
        full, remainder = [], []
        for mix in sorted(set(self.mixes), key=repr):
            members = [i for i, m in enumerate(self.mixes) if m == mix]
            shuffled = [members[j] for j in torch.randperm(len(members), generator=generator).tolist()]
            cut = len(shuffled) - len(shuffled) % self.batch_size
            remainder += shuffled[cut:]
            for start in range(0, cut, self.megabatch):   # megabatches are whole batches
                group = by_longest(shuffled[start:min(start + self.megabatch, cut)])
                full += [group[k:k + self.batch_size] for k in range(0, len(group), self.batch_size)]
        remainder = by_longest(remainder)
        full += [remainder[k:k + self.batch_size] for k in range(0, len(remainder), self.batch_size)]
        last = full.pop() if full and len(full[-1]) < self.batch_size else None
        batches = [full[b] for b in torch.randperm(len(full), generator=generator).tolist()]
        return batches + ([last] if last else [])

    def __iter__(self) -> Iterator[int]:
        for batch in self.batches():
            yield from batch


def padding_fraction(batches: Sequence[Sequence[int]], lengths: Sequence[int]) -> float:
    """Share of the tokens in right-padded batches that are padding."""
    padded = sum(max(lengths[i] for i in batch) * len(batch) for batch in batches if batch)
    real = sum(lengths[i] for batch in batches for i in batch)
    return 1 - real / padded if padded else 0.0
