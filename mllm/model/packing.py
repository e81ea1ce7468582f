"""The LM's inputs for packed rows (``data.packing``, ``mllm.data.packing``): attention that stays
inside each sample.

Position ids restart at 0 at every sample (and at the row's padding, which thereby is a sequence of
its own that no sample sees), and the LM gets no 2-D padding mask. transformers then isolates the
samples itself, on every attention path:

* sdpa, eager, flex (the CPU paths): with ``attention_mask=None`` and no KV cache (``use_cache=False``)
  its mask builder detects packed rows from position ids that do not step by one
  (``masking_utils.find_packed_sequence_indices``) and builds a block-diagonal causal mask (checked
  on transformers 5.25 with LLaMA: packed logits equal each sample's own, for sdpa and eager);
* flash-attention: the cumulative sample lengths over the flattened batch are passed as
  ``cu_seq_lens_q/k`` with ``max_length_q/k``, so the varlen kernel runs each sample alone (its
  position-id detection alone covers only a batch of one row).
"""

from __future__ import annotations

import torch


def positions_from_segments(segment_ids: torch.Tensor) -> torch.Tensor:
    """(B, T) position ids counting from 0 at the start of every run of equal segment ids."""
    length = segment_ids.shape[1]
    index = torch.arange(length, device=segment_ids.device).expand_as(segment_ids)
    starts = torch.ones_like(segment_ids, dtype=torch.bool)
    starts[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
    start_index = torch.where(starts, index, torch.zeros_like(index)).cummax(dim=1).values
    return index - start_index


def packed_lm_kwargs(llm_config, segment_ids: torch.Tensor) -> dict:
    """Keyword arguments for the LM's forward on packed rows (module docstring)."""
    position_ids = positions_from_segments(segment_ids)
    # No KV cache: transformers looks for packed rows only in a forward without one.
    kwargs = {"attention_mask": None, "position_ids": position_ids, "use_cache": False}
    if "flash" in str(getattr(llm_config, "_attn_implementation", "")):
        flat = position_ids.reshape(-1)
        starts = (flat == 0).nonzero().view(-1)
        cu_seq_lens = torch.cat([starts, flat.new_tensor([flat.numel()])]).to(torch.int32)
        max_length = int(cu_seq_lens.diff().max())
        kwargs.update(cu_seq_lens_q=cu_seq_lens, cu_seq_lens_k=cu_seq_lens,
                      max_length_q=max_length, max_length_k=max_length)
    return kwargs
