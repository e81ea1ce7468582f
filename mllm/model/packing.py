"""The LM's inputs for packed rows (``data.packing``, ``mllm.data.packing``): attention that stays
inside each sample.

Position ids restart at 0 at every sample (and at the row's padding, which thereby is a sequence of
its own that no sample sees). The samples are then kept apart by the attention path:

* sdpa (transformers' default on CPU and GPU without flash-attention): :func:`packed_lm_kwargs`
  switches the LM to :data:`SEGMENT_SDPA`, which runs SDPA on each sample alone (causal, no mask)
  from the samples' cumulative lengths ``cu_seq_lens_q``, and is transformers' sdpa for every other
  input (unpacked batches, generation) and for layers whose attention is more than causal (a
  sliding window: transformers' mask keeps their samples apart). Attention then costs the sum of
  the samples' squared lengths, not the row's squared length (the block-diagonal mask transformers
  still builds goes unused: a few ms per forward at 3 x 1024 tokens);
* eager, flex: with ``attention_mask=None`` and no KV cache (``use_cache=False``) transformers'
  mask builder detects packed rows from position ids that do not step by one
  (``masking_utils.find_packed_sequence_indices``) and builds a block-diagonal causal mask (checked
  on transformers 5.25 with LLaMA: packed logits equal each sample's own);
* flash-attention: the cumulative sample lengths over the flattened batch are passed as
  ``cu_seq_lens_q/k`` with ``max_length_q/k``, so the varlen kernel runs each sample alone (its
  position-id detection alone covers only a batch of one row).
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward, use_gqa_in_sdpa
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

#: The attention implementation packed rows run on in place of ``sdpa`` (registered with transformers).
SEGMENT_SDPA = "sdpa_segments"


def segment_sdpa_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                           attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                           is_causal: bool | None = None, cu_seq_lens_q: torch.Tensor | None = None,
                           **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature: query (B, H, T, D), key and value (B, H_kv, T, D);
    returns (B, T, H, D). With ``cu_seq_lens_q`` (the sequences' start offsets in the flattened
    B * T tokens, then B * T; no sequence crosses a row), SDPA runs on each sequence alone and the
    mask is not used; without, or where attention is more than causal (a sliding window, a position
    bias, softcapping), this is transformers' sdpa, whose mask keeps packed samples apart too."""
    if cu_seq_lens_q is None or any(kwargs.get(k) is not None for k in ("sliding_window", "position_bias", "softcap")):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    batch, heads, length, _ = query.shape
    sdpa_kwargs = {}
    groups = getattr(module, "num_key_value_groups", 1)
    if groups > 1:
        if use_gqa_in_sdpa(None, key, value):
            sdpa_kwargs["enable_gqa"] = True
        else:
            key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    is_causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    lengths = cu_seq_lens_q.diff().tolist()
    # (B, H, T, D) -> (B * T, H, D): a view for LLaMA-style layers (their projections are (B, T, H, D));
    # split (not slicing) so that backward puts the pieces together with one cat.
    pieces = [tensor.transpose(1, 2).reshape(batch * length, tensor.shape[1], tensor.shape[3]).split(lengths)
              for tensor in (query, key, value)]
    outputs = [torch.nn.functional.scaled_dot_product_attention(
        q.transpose(0, 1).unsqueeze(0), k.transpose(0, 1).unsqueeze(0), v.transpose(0, 1).unsqueeze(0),
        dropout_p=dropout, scale=scaling, is_causal=is_causal and len(q) > 1, **sdpa_kwargs).squeeze(0).transpose(0, 1)
        for q, k, v in zip(*pieces)]
    return torch.cat(outputs).view(batch, length, heads, value.shape[-1]), None


AttentionInterface.register(SEGMENT_SDPA, segment_sdpa_attention)
# Unpacked inputs need sdpa's masks (padding, generation); packed rows build one they do not use.
AttentionMaskInterface.register(SEGMENT_SDPA, sdpa_mask)


def positions_from_segments(segment_ids: torch.Tensor) -> torch.Tensor:
    """(B, T) position ids counting from 0 at the start of every run of equal segment ids."""
    length = segment_ids.shape[1]
    index = torch.arange(length, device=segment_ids.device).expand_as(segment_ids)
    starts = torch.ones_like(segment_ids, dtype=torch.bool)
    starts[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
    start_index = torch.where(starts, index, torch.zeros_like(index)).cummax(dim=1).values
    return index - start_index


def cumulative_lengths(position_ids: torch.Tensor) -> torch.Tensor:
    """(N + 1,) int32 start offsets of the N sequences in the flattened (B, T) positions, then B * T."""
    flat = position_ids.reshape(-1)
    starts = (flat == 0).nonzero().view(-1)
    return torch.cat([starts, flat.new_tensor([flat.numel()])]).to(torch.int32)


def packed_lm_kwargs(llm_config, segment_ids: torch.Tensor) -> dict:
    """Keyword arguments for the LM's forward on packed rows (module docstring). An LM on ``sdpa``
    is switched to :data:`SEGMENT_SDPA` (through ``llm_config``, which its layers share)."""
    if getattr(llm_config, "_attn_implementation", None) == "sdpa":
        llm_config._attn_implementation = SEGMENT_SDPA
    implementation = str(getattr(llm_config, "_attn_implementation", ""))
    position_ids = positions_from_segments(segment_ids)
    # No KV cache: transformers looks for packed rows only in a forward without one.
    kwargs = {"attention_mask": None, "position_ids": position_ids, "use_cache": False}
    if implementation == SEGMENT_SDPA:   # on the CPU: every layer reads the lengths, one device sync
        kwargs["cu_seq_lens_q"] = cumulative_lengths(position_ids).cpu()
    elif "flash" in implementation:
        cu_seq_lens = cumulative_lengths(position_ids)
        max_length = int(cu_seq_lens.diff().max())
        kwargs.update(cu_seq_lens_q=cu_seq_lens, cu_seq_lens_k=cu_seq_lens,
                      max_length_q=max_length, max_length_k=max_length)
    return kwargs
