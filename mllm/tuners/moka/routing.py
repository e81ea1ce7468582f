"""Per-token routing tensors for MokA layers, computed once per forward and shared by all layers.

The ``ModalityContext`` (DESIGN contract 2) publishes ``modality_ids`` (B, T) and ``question_mask``
(B, T) for the sequence being forwarded. Every adapted Linear needs the same derived tensors (which
column of the stacked codes each token keeps, the compact key set of the cross-modal
interaction, the strengths), so the router computes them on the first layer's call and serves the
rest from a cache that lives until the context publishes new tensors. Gradient-checkpointing
recomputation sees the same context tensors, hence the same routes.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
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

    @cached_property
    def text_block(self) -> slice:
        """Rows of A_text in the stacked A."""
        return self.block(self.text_slot)

    @cached_property
    def text_b_columns(self) -> Optional[slice]:
        """Columns of B that A_text's codes meet (None: all of B, so no slice op per call):
        its own block for unimodal_lora, else the first rank(text) coordinates of the rank space."""
        block = self.text_block
        if self.variant == "unimodal_lora":
            return block
        width = block.stop - block.start
        return None if width == self.b_cols else slice(0, width)

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
    key_bias: Optional[torch.Tensor]       # (B, 1, Nk) 0 on keys, -inf on padding slots (additive mask);
                                           # (B, T, Nk) in packed rows (keys of the query's own sample);
                                           # None when every slot is a key
    query_modality: Optional[torch.Tensor]  # (B, T, non-text modalities) one-hot (cross_attention=projected)
    key_mean: Optional[torch.Tensor]       # (B, 1, Nk) uniform weights over the keys (naive interaction);
                                           # (B, T, Nk) in packed rows


@dataclass
class Routes:
    """Routing tensors for one adapter and one forwarded sequence (B, T)."""

    shape: tuple[int, int]
    text_only: bool                           # every position is text and the variant is moka or
                                              # unimodal_lora: the layer runs plain LoRA with A_text
    column_weights: Optional[torch.Tensor]    # (B, T, rows of A) per low-rank column (non-MokA variants)
    rank_columns: Optional[torch.Tensor]      # MokA: (B, T, r) column of x_t's codes under the stacked A that
                                              # gives coordinate j of A_{m(t)} x_t in the rank space
    rank_mask: Optional[torch.Tensor]         # MokA: (B, T, 1), or (B, T, r) with unequal ranks: 0 on pads and
                                              # on coordinates beyond the modality's rank; None if all ones
    interaction: Optional[Interaction]        # None when no token of the batch gets a cross-modal term


_UNSET = object()


class ModalityRouter:
    """Shared by all MokA layers of one model; reads the ``ModalityContext``."""

    def __init__(self, context):
        self.context = context
        #: Partial-modality inference (paper section 4.3): only this modality's tokens get adapter
        #: output on the prompt pass (None: all tokens). KV-cache decode steps are unaffected.
        #: Set through ``MokaModel.partial_modality``.
        self.partial_modality: Optional[str] = None
        self._source: tuple = (_UNSET, _UNSET, _UNSET)   # (ids, question mask, segments) of the caches below
        # Routes of the current ids, two ways: by the layer's own layout object (the hot path:
        # one dict lookup per layer call, no hashing of the dataclass), and by the layout's value
        # (so equal layouts of different layers share one computation).
        self._by_object: dict = {}
        self._cache: dict = {}

    def routes(self, layout: AdapterLayout, dtype: torch.dtype, device: torch.device) -> Routes:
        context = self.context
        ids, question, segments = context.modality_ids, context.question_mask, context.segment_ids
        source = self._source
        if source[0] is not ids or source[1] is not question or source[2] is not segments:
            if ids is None:
                raise RuntimeError("MokA needs per-token modality ids, but none were published for this forward "
                                   "(only input_ids with no media input are taken as text; inputs_embeds may "
                                   "hide media). A MultimodalLM publishes them itself; for a plain model call "
                                   "mllm.modality_context.set_modality_ids(model, ids, question_mask) "
                                   "before the forward.")
            self._source, self._by_object, self._cache = (ids, question, segments), {}, {}
        # Section 4.3 restricts the adapter on "the first generation", i.e. the prompt pass; decode
        # steps extend the cache with generated text tokens, which take the text A as usual.
        partial = None if context.decode_step else self.partial_modality
        fast_key = (id(layout), partial, dtype, device)
        entry = self._by_object.get(fast_key)
        if entry is not None and entry[0] is layout:  # the entry holds the layout, so its id is not reused
            return entry[1]
        key = (layout, partial, dtype, device)
        routes = self._cache.get(key)
        if routes is None:
            with torch.no_grad():
                routes = self._cache[key] = _compute_routes(
                    layout, ids.to(device), question.to(device), partial, dtype,
                    None if segments is None else segments.to(device))
        self._by_object[fast_key] = (layout, routes)
        return routes


@dataclass
class _Tables:
    """Constant lookup tables of one adapter layout on one device, indexed by a token's slot: its
    modality's position in ``layout.modalities``, ``pad`` for padding (and tokens that partial-
    modality inference leaves out), ``unknown`` for a modality the adapter does not have."""

    slot_of_id: torch.Tensor       # (len(Modality) + 1,) slot of modality id v at index v + 1 (PAD = -1
                                   # at 0); the last entry is "unknown", for out-of-range ids
    pad: int
    unknown: int
    rank_columns: torch.Tensor     # (slots, r) long: column of the stacked codes for each rank coordinate
    rank_mask: torch.Tensor        # (slots, r): 1 on the coordinates a modality fills, 0 for pad / unknown
    strength: torch.Tensor         # (slots,) lambda of non-text modalities as queries; 0 for text, pad, unknown


_TABLES: dict = {}


def _tables(layout: AdapterLayout, device: torch.device, dtype: torch.dtype) -> _Tables:
    key = (layout, device, dtype)
    tables = _TABLES.get(key)
    if tables is None:
        num = len(layout.modalities)
        pad, unknown = num, num + 1
        slot_of_id = [unknown] * (len(Modality) + 1)
        slot_of_id[int(Modality.PAD) + 1] = pad
        for slot, name in enumerate(layout.modalities):
            slot_of_id[int(Modality[name.upper()]) + 1] = slot
        columns, mask = [], []
        for slot in range(num + 2):
            block = layout.block(slot if slot < num else 0)   # pad / unknown rows: any column, masked
            rank = block.stop - block.start
            columns.append([block.start + min(j, rank - 1) for j in range(layout.r)])
            mask.append([float(slot < num and j < rank) for j in range(layout.r)])
        strength = [0.0 if slot == layout.text_slot else layout.strengths[slot] for slot in range(num)] + [0.0, 0.0]
        tables = _TABLES[key] = _Tables(
            slot_of_id=torch.tensor(slot_of_id, device=device), pad=pad, unknown=unknown,
            rank_columns=torch.tensor(columns, device=device), rank_mask=torch.tensor(mask, dtype=dtype, device=device),
            strength=torch.tensor(strength, dtype=dtype, device=device))
    return tables


def _compute_routes(layout: AdapterLayout, ids: torch.Tensor, question: torch.Tensor,
                    partial: Optional[str], dtype: torch.dtype, segments: Optional[torch.Tensor] = None) -> Routes:
    """``segments``: packed rows' sample of each token (``ModalityContext.segment_ids``), or None."""
    device = ids.device
    if layout.variant in ("moka", "unimodal_lora") and partial in (None, "text") \
            and bool((ids == int(Modality.TEXT)).all()):
        # Every token is text (decode steps, text-only batches): the layer runs plain LoRA with the
        # text A. Checked first, with one comparison, since it is the case of every decode step.
        return Routes(shape=tuple(ids.shape), text_only=True, column_weights=None, rank_columns=None,
                      rank_mask=None, interaction=None)
    tables = _tables(layout, device, dtype)
    # ids outside the table (below PAD or above the last modality) index its last entry, unknown.
    slot = tables.slot_of_id[(ids + 1).clamp(-1, len(tables.slot_of_id) - 1)]     # (B, T)
    if bool((slot == tables.unknown).any()):
        found = sorted({Modality(int(v)).name.lower() if int(v) in set(Modality) else str(int(v))
                        for v in ids[slot == tables.unknown].unique()})
        raise ValueError(f"tokens of modality {found} reach a MokA adapter configured for {list(layout.modalities)}")
    if partial is not None:
        # Section 4.3: only the selected modality's tokens pass through the adapter path.
        slot = slot.masked_fill(ids != int(Modality[partial.upper()]), tables.pad)
    valid = slot != tables.pad

    column_weights = rank_columns = rank_mask = None
    if layout.variant == "moka":
        # Eq 4 as a gather: which column of the stacked codes feeds each rank-space coordinate. A
        # modality of rank r_m < r fills only the first r_m coordinates; its other coordinates
        # point into its own block and are zeroed by the mask, as are pad tokens.
        rank_columns = tables.rank_columns[slot]                                     # (B, T, r)
        if not layout.equal_ranks:
            rank_mask = tables.rank_mask[slot]                                       # (B, T, r)
        elif not bool(valid.all()):
            rank_mask = valid.unsqueeze(-1).to(dtype)                                # (B, T, 1)
    else:
        weights = (slot.unsqueeze(-1) == torch.arange(len(layout.modalities), device=device)).to(dtype)
        ranks = torch.tensor(layout.ranks, device=device)
        if layout.variant == "unimodal_lora":
            column_weights = weights.repeat_interleave(ranks, dim=-1)
        elif layout.variant == "multiple_lora":
            column_weights = valid.unsqueeze(-1).to(dtype)           # every LoRA sees every token
        elif layout.variant in ("uni_mm_lora", "uni_mm_lora_gate"):
            shared = valid.unsqueeze(-1).to(dtype).expand(*valid.shape, layout.r)
            column_weights = torch.cat([weights.repeat_interleave(ranks, dim=-1), shared], dim=-1)

    mode = layout.cross_attention if partial is None else "none"  # section 4.3 evaluates w/o CA
    interaction = None if mode == "none" else _interaction(layout, tables, mode, slot, valid, question, dtype,
                                                           segments)
    return Routes(shape=tuple(ids.shape), text_only=False, column_weights=column_weights,
                  rank_columns=rank_columns, rank_mask=rank_mask, interaction=interaction)


def _interaction(layout: AdapterLayout, tables: _Tables, mode: str, slot: torch.Tensor, valid: torch.Tensor,
                 question: torch.Tensor, dtype: torch.dtype,
                 segments: Optional[torch.Tensor] = None) -> Optional[Interaction]:
    """Strengths and compact key set of the cross-modal term; None when no token has one. In packed
    rows (``segments``) a query sees only the keys of its own sample."""
    is_text = slot == layout.text_slot
    if mode == "text_queries":
        # Cross-attention*: the question tokens query the sample's non-text tokens.
        keys = valid & ~is_text
        strength = (question & is_text).to(dtype) * layout.strengths[layout.text_slot]
    else:
        # Eqs 5-8: non-text tokens query the question-text tokens of the same sample.
        keys = question & is_text
        strength = tables.strength[slot]                           # (B, T)
    counts = keys.sum(-1)                                          # (B,) keys per row
    if segments is None:
        has_keys = (counts > 0).unsqueeze(-1)                      # (B, 1): samples without keys get none
    else:
        # Per token: does its own sample (segment) have keys?
        segment_keys = torch.zeros(segments.shape[0], int(segments.max()) + 2, dtype=counts.dtype,
                                   device=slot.device)
        segment_keys.scatter_add_(1, segments + 1, keys.to(counts.dtype))   # column 0: padding (-1)
        has_keys = (segment_keys.gather(1, segments + 1) > 0) & (segments >= 0)   # (B, T)
    strength = strength * has_keys.to(dtype)
    if not bool((strength != 0).any()):
        return None
    # A stable sort of "not a key" puts each row's key positions first, in order; the padding
    # slots after them point at other positions of the same row and are masked.
    num_keys = int(counts.max())
    key_position = torch.sort((~keys).to(torch.uint8), dim=-1, stable=True).indices[:, :num_keys]
    key_bias = query_modality = key_mean = None
    if segments is not None:
        # Packed rows: key slot k is open to query t when it is a key of t's sample. A token whose
        # sample has no keys has strength 0; its slots stay open so that its softmax row is finite.
        is_key = keys.gather(1, key_position)                      # (B, Nk)
        same_sample = segments.unsqueeze(-1) == segments.gather(1, key_position).unsqueeze(1)   # (B, T, Nk)
        visible = same_sample & is_key.unsqueeze(1)
        if mode == "naive":
            key_mean = visible.to(dtype) / visible.sum(-1, keepdim=True).clamp(min=1).to(dtype)
        else:
            open_slots = visible | ~has_keys.unsqueeze(-1)
            key_bias = torch.zeros(open_slots.shape, dtype=dtype, device=slot.device)
            key_bias = key_bias.masked_fill(~open_slots, float("-inf"))   # (B, T, Nk)
    # A sample without keys has only zero-strength queries; its slots stay open so that its
    # softmax rows are finite (an all -inf row gives NaN, and 0 * NaN is NaN). When every sample
    # has num_keys keys or none, no slot is padding and no mask is needed.
    elif mode == "naive" or not bool(((counts == num_keys) | (counts == 0)).all()):
        is_key = keys.gather(1, key_position)                      # (B, Nk)
        if mode == "naive":
            key_mean = (is_key.to(dtype) / counts.clamp(min=1).unsqueeze(-1).to(dtype)).unsqueeze(1)
        else:
            open_slots = is_key | ~has_keys
            key_bias = torch.zeros(open_slots.shape, dtype=dtype, device=slot.device)
            key_bias = key_bias.masked_fill(~open_slots, float("-inf")).unsqueeze(1)
    if mode == "projected":
        nontext = torch.tensor(layout.nontext_slots, device=slot.device)
        query_modality = (slot.unsqueeze(-1) == nontext).to(dtype)  # (B, T, non-text modalities)
    return Interaction(strength=strength.unsqueeze(-1),
                       key_index=key_position.unsqueeze(-1).expand(-1, -1, layout.r).contiguous(),
                       key_bias=key_bias, query_modality=query_modality, key_mean=key_mean)
