"""DeLo on packed rows (``data.packing``): routing per sample, not per row.

DeLo routes every *sample* with its own query signals (figure 2). In a packed row several samples
share the row, so the query pass pools per segment (``ModalityContext.segment_ids``), every routing
tensor has one entry per sample (rows first, then their samples in order), and a layer gives each
token the factors its own sample selected: the samples' factors are laid out side by side per row,
``slots`` x ``R`` columns wide, and each token keeps only its slot's columns. That is the unpacked
computation with zeros added, so a packed sample's update equals its unpacked one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class PackedSamples:
    """Where the samples of a packed batch are: sample s is segment ``slot[s]`` of row ``row[s]``."""

    row: torch.Tensor           # (S,) long
    slot: torch.Tensor          # (S,) long
    token_slot: torch.Tensor    # (B, T) long: the token's slot in its row, -1 on padding
    num_slots: int              # the most samples in one row

    @property
    def num_samples(self) -> int:
        return int(self.row.shape[0])

    def token_sample(self) -> torch.Tensor:
        """(B, T) index of each token's sample in the sample order, -1 on padding."""
        rows = self.token_slot.shape[0]
        index = torch.full((rows, self.num_slots), -1, dtype=torch.long, device=self.token_slot.device)
        index[self.row, self.slot] = torch.arange(self.num_samples, device=index.device)
        sample = index.gather(1, self.token_slot.clamp(min=0))
        return sample.masked_fill(self.token_slot < 0, -1)


def packed_samples(segment_ids: torch.Tensor) -> PackedSamples:
    """The samples of a packed batch from its (B, T) segment ids (-1 on padding)."""
    num_slots = int(segment_ids.max()) + 1 if segment_ids.numel() else 0
    present = torch.zeros(segment_ids.shape[0], max(num_slots, 1), dtype=torch.bool, device=segment_ids.device)
    valid = segment_ids >= 0
    rows = torch.arange(segment_ids.shape[0], device=segment_ids.device).unsqueeze(1).expand_as(segment_ids)
    present[rows[valid], segment_ids[valid]] = True
    row, slot = present.nonzero(as_tuple=True)     # row-major: rows first, then their samples
    return PackedSamples(row=row, slot=slot, token_slot=segment_ids, num_slots=max(num_slots, 1))


def pool_per_sample(hidden: torch.Tensor, masks: torch.Tensor,
                    samples: PackedSamples) -> tuple[torch.Tensor, torch.Tensor]:
    """(S, M, d) mean of ``hidden`` (B, T, d) over each sample's tokens of each of the M modality
    ``masks`` (B, M, T), 0 where a sample has no such token; and (S, M) whether it has any."""
    flat_sample = samples.token_sample().reshape(-1)
    keep = flat_sample >= 0
    weights = masks.transpose(1, 2).reshape(-1, masks.shape[1])[keep]              # (N, M)
    tokens = hidden.reshape(-1, hidden.shape[-1])[keep]                            # (N, d)
    index = flat_sample[keep]
    sums = hidden.new_zeros(samples.num_samples, masks.shape[1], hidden.shape[-1])
    sums.index_add_(0, index, weights.unsqueeze(-1) * tokens.unsqueeze(1))
    counts = hidden.new_zeros(samples.num_samples, masks.shape[1]).index_add_(0, index, weights)
    return sums / counts.clamp(min=1).unsqueeze(-1), counts > 0


def per_row(samples: PackedSamples, per_sample: torch.Tensor) -> torch.Tensor:
    """(S, R, ...) per-sample tensors -> (B, slots * R, ...) laid out by row and slot, zeros where a
    row has fewer samples."""
    rows = samples.token_slot.shape[0]
    out = per_sample.new_zeros(rows, samples.num_slots, *per_sample.shape[1:])
    out[samples.row, samples.slot] = per_sample
    return out.flatten(1, 2)


def slot_columns(samples: PackedSamples, width: int, dtype: torch.dtype) -> torch.Tensor:
    """(B, T, slots * width): 1 on the columns of the token's own slot, 0 elsewhere (and on padding)."""
    one_hot = torch.nn.functional.one_hot(samples.token_slot.clamp(min=0), samples.num_slots)
    one_hot = one_hot * (samples.token_slot >= 0).unsqueeze(-1)
    return one_hot.to(dtype).repeat_interleave(width, dim=-1)
