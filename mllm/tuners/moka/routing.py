"""Per-token routing tensors for MokA layers, computed once per forward and shared by all layers.

The ``ModalityContext`` (DESIGN contract 2) publishes ``modality_ids`` (B, T) and ``question_mask``
(B, T) for the sequence being forwarded. Every adapted Linear needs the same derived tensors (which
column of the stacked codes each token keeps, the compact query and key sets of the cross-modal
interaction, the strengths), so the router computes them on the first layer's call and serves the
rest from a cache that lives until the context publishes new tensors. Gradient-checkpointing
recomputation sees the same context tensors, hence the same routes.
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
class Interaction:
    """Inputs of the cross-modal term for one batch.

    Every token is a query row, weighted by its strength lambda (0 for tokens that get no term): a
    row costs only r-wide work, less than compacting the queries would. The keys are gathered per
    sample into a compact set padded to the largest count in the batch, so the attention is
    (B, T, Nk) rather than (B, T, T), and a query sees only the keys of its own sample.
    """

    strength: torch.Tensor                 # (B, T, 1) lambda of the token as a query; 0 for no term
    key_index: torch.Tensor                # (B, Nk, r) position of each key slot, repeated over the rank
                                           # coordinates (a torch.gather index along the tokens)
    key_bias: torch.Tensor                 # (B, 1, Nk) 0 on keys, -inf on padding slots (additive mask)
    query_modality: Optional[torch.Tensor]  # (B, T, non-text modalities) one-hot (cross_attention=projected)
    key_mean: Optional[torch.Tensor]       # (B, 1, Nk) uniform weights over the keys (naive interaction)


@dataclass
class Routes:
    """Routing tensors for one adapter and one forwarded sequence (B, T)."""

    shape: tuple[int, int]
    text_only: bool                           # every position is a text token: plain LoRA path
    modality_weights: Optional[torch.Tensor]  # (B, T, M) one-hot of the token's modality; zero on pads
    column_weights: Optional[torch.Tensor]    # (B, T, rows of A) per low-rank column (non-MokA variants)
    rank_columns: Optional[torch.Tensor]      # MokA: (B, T, r) column of x_t's codes under the stacked A that
                                              # gives coordinate j of A_{m(t)} x_t in the rank space
    rank_mask: Optional[torch.Tensor]         # MokA: (B, T, 1), or (B, T, r) with unequal ranks: 0 on pads and
                                              # on coordinates beyond the modality's rank; None if all ones
    interaction: Optional[Interaction]        # None when no token of the batch gets a cross-modal term


class ModalityRouter:
    """Shared by all MokA layers of one model; reads the ``ModalityContext``."""

    def __init__(self, context):
        self.context = context
        #: Partial-modality inference (paper section 4.3): only this modality's tokens get adapter
        #: output on the prompt pass (None: all tokens). KV-cache decode steps are unaffected.
        #: Set through ``MokaModel.partial_modality``.
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
        # Section 4.3 restricts the adapter on "the first generation", i.e. the prompt pass; decode
        # steps extend the cache with generated text tokens, which take the text A as usual.
        partial = None if self.context.decode_step else self.partial_modality
        key = (layout, partial, dtype, device)
        routes = self._cache.get(key)
        if routes is None:
            with torch.no_grad():
                routes = self._cache[key] = _compute_routes(layout, ids.to(device), question.to(device),
                                                            partial, dtype)
        return routes


def _compute_routes(layout: AdapterLayout, ids: torch.Tensor, question: torch.Tensor,
                    partial: Optional[str], dtype: torch.dtype) -> Routes:
    device = ids.device
    slot_ids = torch.tensor([int(Modality[m.upper()]) for m in layout.modalities], device=device)
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
    if text_only and layout.variant in ("moka", "unimodal_lora"):
        # The layer runs plain LoRA with the text A (decode steps, text-only batches).
        return Routes(shape=tuple(ids.shape), text_only=True, modality_weights=None, column_weights=None,
                      rank_columns=None, rank_mask=None, interaction=None)
    weights = onehot.to(dtype)

    ranks = torch.tensor(layout.ranks, device=device)
    column_weights = rank_columns = rank_mask = None
    if layout.variant == "moka":
        rank_columns, rank_mask = _rank_selection(layout, onehot, valid, dtype)
    elif layout.variant == "unimodal_lora":
        column_weights = weights.repeat_interleave(ranks, dim=-1)
    elif layout.variant == "multiple_lora":
        column_weights = valid.unsqueeze(-1).to(dtype)           # every LoRA sees every token
    elif layout.variant in ("uni_mm_lora", "uni_mm_lora_gate"):
        shared = valid.unsqueeze(-1).to(dtype).expand(*valid.shape, layout.r)
        column_weights = torch.cat([weights.repeat_interleave(ranks, dim=-1), shared], dim=-1)

    mode = layout.cross_attention if partial is None else "none"  # section 4.3 evaluates w/o CA
    interaction = None if mode == "none" else _interaction(layout, mode, onehot, weights, valid, question, dtype)
    return Routes(shape=tuple(ids.shape), text_only=text_only, modality_weights=weights,
                  column_weights=column_weights, rank_columns=rank_columns, rank_mask=rank_mask,
                  interaction=interaction)


def _rank_selection(layout: AdapterLayout, onehot: torch.Tensor, valid: torch.Tensor,
                    dtype: torch.dtype) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Eq 4 as a gather: which column of the stacked codes feeds each rank-space coordinate.

    A modality of rank r_m < r fills only the first r_m coordinates; its other coordinates point
    into its own block and are zeroed by the mask, as are pad tokens.
    """
    device = onehot.device
    slot = (onehot * torch.arange(onehot.shape[-1], device=device)).sum(-1)       # (B, T) token's modality
    block_start = torch.tensor([layout.block(i).start for i in range(len(layout.modalities))], device=device)
    ranks = torch.tensor(layout.ranks, device=device)
    coordinate = torch.arange(layout.r, device=device)
    token_rank = ranks[slot].unsqueeze(-1)                                         # (B, T, 1)
    rank_columns = block_start[slot].unsqueeze(-1) + torch.minimum(coordinate, token_rank - 1)
    if not layout.equal_ranks:
        rank_mask = ((coordinate < token_rank) & valid.unsqueeze(-1)).to(dtype)
    elif not bool(valid.all()):
        rank_mask = valid.unsqueeze(-1).to(dtype)
    else:
        rank_mask = None
    return rank_columns, rank_mask


def _interaction(layout: AdapterLayout, mode: str, onehot: torch.Tensor, weights: torch.Tensor,
                 valid: torch.Tensor, question: torch.Tensor, dtype: torch.dtype) -> Optional[Interaction]:
    """Strengths and compact key set of the cross-modal term; None when no token has one."""
    lambdas = torch.tensor(layout.strengths, dtype=dtype, device=onehot.device)
    is_text = onehot[..., layout.text_slot]
    if mode == "text_queries":
        # Cross-attention*: the question tokens query the sample's non-text tokens.
        keys = valid & ~is_text
        strength = (question & is_text).to(dtype) * lambdas[layout.text_slot]
    else:
        # Eqs 5-8: non-text tokens query the question-text tokens of the same sample.
        keys = question & is_text
        nontext_lambdas = lambdas.clone()
        nontext_lambdas[layout.text_slot] = 0
        strength = weights @ nontext_lambdas                       # (B, T)
    has_keys = keys.any(-1, keepdim=True)                          # (B, 1): samples without keys get none
    strength = strength * has_keys.to(dtype)
    if not bool((strength != 0).any()):
        return None
    # A stable sort of "not a key" puts each sample's key positions first, in order; the padding
    # slots after them point at other positions of the same sample and are masked.
    num_keys = int(keys.sum(-1).max())
    key_position = torch.sort((~keys).to(torch.uint8), dim=-1, stable=True).indices[:, :num_keys]
    is_key = keys.gather(1, key_position)                          # (B, Nk)
    # A sample without keys has only zero-strength queries; its slots stay open so that its
    # softmax rows are finite (an all -inf row gives NaN, and 0 * NaN is NaN).
    open_slots = is_key | ~has_keys
    key_bias = torch.zeros(open_slots.shape, dtype=dtype, device=onehot.device)
    key_bias = key_bias.masked_fill(~open_slots, float("-inf")).unsqueeze(1)
    query_modality = key_mean = None
    if mode == "projected":
        query_modality = weights[..., list(layout.nontext_slots)]
    if mode == "naive":
        counts = is_key.sum(-1, keepdim=True).clamp(min=1)
        key_mean = (is_key.to(dtype) / counts.to(dtype)).unsqueeze(1)
    return Interaction(strength=strength.unsqueeze(-1),
                       key_index=key_position.unsqueeze(-1).expand(-1, -1, layout.r),
                       key_bias=key_bias, query_modality=query_modality, key_mean=key_mean)
