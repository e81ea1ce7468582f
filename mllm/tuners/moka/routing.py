"""Per-token routing tensors for MokA layers, computed once per forward and shared by all layers.

The ``ModalityContext`` (DESIGN contract 2) publishes ``modality_ids`` (B, T) and ``question_mask``
(B, T) for the sequence being forwarded. Every adapted Linear needs the same derived tensors (one-hot
modality weights, cross-attention key masks, strengths), so the router computes them on the first
layer's call and serves the rest from a cache that lives until the context publishes new tensors.
Gradient-checkpointing recomputation sees the same context tensors, hence the same routes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from mllm.modality import Modality


@dataclass(frozen=True)
class AdapterLayout:
    """What a layer and the router need to know about one adapter (derived from MokaConfig)."""

    variant: str
    cross_attention: str               # "none" unless variant == "moka"
    modalities: tuple[str, ...]        # config order; also the order of A's row blocks
    ranks: tuple[int, ...]             # rank of each modality's A
    r: int                             # dimension of the shared rank space
    strengths: tuple[float, ...]       # lambda per modality (cross-attention query strength)
    num_loras: int                     # variant multiple_lora

    @classmethod
    def from_config(cls, config) -> "AdapterLayout":
        modalities = tuple(config.modalities)
        return cls(
            variant=config.variant,
            cross_attention=config.cross_attention if config.variant == "moka" else "none",
            modalities=modalities,
            ranks=tuple(config.rank_of(m) for m in modalities),
            r=config.r,
            strengths=tuple(float(config.strengths.get(m, 0.0)) for m in modalities),
            num_loras=config.num_loras or len(modalities),
        )

    # -- row / column blocks ----------------------------------------------------------------------
    @property
    def modality_rank_total(self) -> int:
        return sum(self.ranks)

    @property
    def text_slot(self) -> int:
        return self.modalities.index("text")

    def block(self, slot: int) -> slice:
        start = sum(self.ranks[:slot])
        return slice(start, start + self.ranks[slot])

    @property
    def equal_ranks(self) -> bool:
        return all(rank == self.r for rank in self.ranks)

    @property
    def nontext_slots(self) -> tuple[int, ...]:
        return tuple(i for i, m in enumerate(self.modalities) if m != "text")

    @property
    def a_rows(self) -> int:
        """Rows of the stacked A parameter."""
        if self.variant == "multiple_lora":
            return self.num_loras * self.r
        if self.variant in ("uni_mm_lora", "uni_mm_lora_gate"):
            return self.modality_rank_total + self.r   # + the shared multimodal LoRA's A
        return self.modality_rank_total

    @property
    def b_cols(self) -> int:
        """Columns of the B parameter: one shared rank space for MokA, else one block per A block."""
        return self.r if self.variant == "moka" else self.a_rows


@dataclass
class Routes:
    """Routing tensors for one adapter and one forwarded sequence (B, T)."""

    shape: tuple[int, int]
    text_only: bool                           # every position is a text token: plain LoRA path
    modality_weights: torch.Tensor            # (B, T, M) one-hot of the token's modality; zero on pads
    column_weights: Optional[torch.Tensor]    # (B, T, rows of A) per low-rank column (non-MokA variants,
                                              # and MokA with unequal ranks)
    placement: Optional[torch.Tensor]         # (r, sum of ranks): modality blocks -> rank space
    query_strength: Optional[torch.Tensor]    # (B, T, 1) lambda of each query token, 0 elsewhere;
                                              # None when nothing in the batch is a query
    key_bias: Optional[torch.Tensor]          # (B, 1, T) 0 on keys, -inf elsewhere (additive mask)
    key_mean: Optional[torch.Tensor]          # (B, 1, T) uniform weights over keys (naive interaction)


class ModalityRouter:
    """Shared by all MokA layers of one model; reads the ``ModalityContext``."""

    def __init__(self, context):
        self.context = context
        #: Partial-modality inference (paper section 4.3): only this modality's tokens get adapter
        #: output (None: all tokens). Set through ``MokaModel.partial_modality``.
        self.partial_modality: Optional[str] = None
        self._source: tuple = (None, None)
        self._cache: dict = {}

    def routes(self, layout: AdapterLayout, dtype: torch.dtype, device: torch.device) -> Routes:
        ids, question = self.context.modality_ids, self.context.question_mask
        if ids is None:
            raise RuntimeError("MokA needs per-token modality ids, but none were published for this forward. "
                               "A MultimodalLM publishes them itself; for a plain model call "
                               "mllm.model.set_modality_ids(model, ids, question_mask) before the forward.")
        if self._source[0] is not ids or self._source[1] is not question:
            self._source, self._cache = (ids, question), {}
        key = (layout, self.partial_modality, dtype, device)
        routes = self._cache.get(key)
        if routes is None:
            with torch.no_grad():
                routes = self._cache[key] = _compute_routes(layout, ids.to(device), question.to(device),
                                                            self.partial_modality, dtype)
        return routes


def _compute_routes(layout: AdapterLayout, ids: torch.Tensor, question: torch.Tensor,
                    partial: Optional[str], dtype: torch.dtype) -> Routes:
    slot_ids = torch.tensor([int(Modality[m.upper()]) for m in layout.modalities], device=ids.device)
    onehot = ids.unsqueeze(-1) == slot_ids                      # (B, T, M)
    valid = ids != int(Modality.PAD)
    unknown = valid & ~onehot.any(-1)
    if bool(unknown.any()):
        found = sorted({Modality(int(v)).name.lower() for v in ids[unknown].unique()})
        raise ValueError(f"tokens of modality {found} reach a MokA adapter configured for {list(layout.modalities)}")
    if partial is not None:
        # Section 4.3: only the selected modality's tokens pass through the adapter path.
        keep = ids == int(Modality[partial.upper()])
        onehot, valid = onehot & keep.unsqueeze(-1), valid & keep
    text_only = partial in (None, "text") and bool(onehot[..., layout.text_slot].all())
    weights = onehot.to(dtype)

    ranks = torch.tensor(layout.ranks, device=ids.device)
    column_weights = placement = None
    if layout.variant == "moka" and not layout.equal_ranks:
        column_weights = weights.repeat_interleave(ranks, dim=-1)
        placement = torch.zeros(layout.r, layout.modality_rank_total, dtype=dtype, device=ids.device)
        for slot, rank in enumerate(layout.ranks):
            start = layout.block(slot).start
            placement[torch.arange(rank), start + torch.arange(rank)] = 1
    elif layout.variant == "unimodal_lora":
        column_weights = weights.repeat_interleave(ranks, dim=-1)
    elif layout.variant == "multiple_lora":
        column_weights = valid.unsqueeze(-1).to(dtype)           # every LoRA sees every token
    elif layout.variant in ("uni_mm_lora", "uni_mm_lora_gate"):
        shared = valid.unsqueeze(-1).to(dtype).expand(*valid.shape, layout.r)
        column_weights = torch.cat([weights.repeat_interleave(ranks, dim=-1), shared], dim=-1)

    query_strength = key_bias = key_mean = None
    mode = layout.cross_attention if partial is None else "none"  # section 4.3 evaluates w/o CA
    if mode != "none":
        lambdas = torch.tensor(layout.strengths, dtype=dtype, device=ids.device)
        is_text = onehot[..., layout.text_slot]
        if mode == "text_queries":
            # Cross-attention*: the question tokens query the sample's non-text tokens.
            queries = question & is_text
            keys = valid & ~is_text
            strength = queries.to(dtype) * lambdas[layout.text_slot]
        else:
            # Eqs 5-8: non-text tokens query the question-text tokens of the same sample.
            keys = question & is_text
            nontext_lambdas = lambdas.clone()
            nontext_lambdas[layout.text_slot] = 0
            strength = weights @ nontext_lambdas                  # (B, T)
        has_keys = keys.any(-1, keepdim=True)                     # (B, 1): samples without keys get none
        strength = strength * has_keys.to(dtype)
        if bool((strength != 0).any()):
            query_strength = strength.unsqueeze(-1)
            open_keys = keys | ~has_keys                          # avoid all -inf rows (NaN softmax)
            key_bias = torch.zeros(keys.shape, dtype=dtype, device=ids.device).masked_fill(~open_keys, float("-inf"))
            key_bias = key_bias.unsqueeze(1)
            if mode == "naive":
                counts = keys.sum(-1, keepdim=True).clamp(min=1)
                key_mean = (keys.to(dtype) / counts.to(dtype)).unsqueeze(1)
    return Routes(shape=tuple(ids.shape), text_only=text_only, modality_weights=weights,
                  column_weights=column_weights, placement=placement, query_strength=query_strength,
                  key_bias=key_bias, key_mean=key_mean)
