"""Placing media features at their placeholder positions, and the one function that computes
per-token modality ids (DESIGN contract 2).

A sequence holds one placeholder *token* per media position: the data pipeline expands each
``<image>`` in the text into ``num_media_tokens`` copies of the ``<image>`` token id. Features
of all items of one kind in a batch are concatenated sample by sample, in order of appearance,
and fill those positions row by row.
"""

from __future__ import annotations

import torch

from mllm.errors import UserError
from mllm.modality import Modality


class MediaCountError(UserError):
    """The number of placeholder positions does not match the media supplied."""


def compute_modality_ids(input_ids: torch.Tensor, placeholder_modalities: dict[int, Modality],
                         attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """(B, T) ids: each placeholder token gets its modality, every other token TEXT, and
    padding (attention_mask == 0) PAD."""
    ids = torch.full_like(input_ids, int(Modality.TEXT))
    for token_id, modality in placeholder_modalities.items():
        ids = ids.masked_fill(input_ids == token_id, int(modality))
    if attention_mask is not None:
        ids = ids.masked_fill(attention_mask == 0, int(Modality.PAD))
    return ids


def splice_features(inputs_embeds: torch.Tensor, input_ids: torch.Tensor, token_id: int,
                    features: torch.Tensor, what: str = "media") -> torch.Tensor:
    """Write ``features`` (N, L, D) row by row into the positions where ``input_ids ==
    token_id`` (in batch-major, then position order). Returns a new tensor."""
    positions = input_ids == token_id
    num_positions = int(positions.sum())
    rows = features.reshape(-1, features.shape[-1])
    if num_positions != rows.shape[0]:
        raise MediaCountError(
            f"{what}: {num_positions} placeholder positions in the batch but {rows.shape[0]} feature "
            f"rows ({features.shape[0]} items x {features.shape[1]} tokens); each placeholder must be "
            f"expanded to exactly the projector's token count")
    return inputs_embeds.masked_scatter(positions.unsqueeze(-1), rows.to(inputs_embeds.dtype))


def position_ids_from_attention_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that skip left padding (transformers' forward would count pads)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
