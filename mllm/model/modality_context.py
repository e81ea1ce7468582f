"""Per-token modality ids and question mask, published to tuner layers (DESIGN contract 2).

One ``ModalityContext`` is attached to the causal LM. Tuner layers keep a reference to it and
read ``modality_ids`` / ``question_mask`` for the sequence the LM is forwarding right now.

The state is *sticky*: it is set at the start of each LM forward and stays until the next one,
so gradient-checkpointing recomputation (which happens after the forward, during backward)
sees the same ids. It is set by a forward pre-hook on the LM, which makes it right for every
call without any change to transformers' model code:

* training / plain forward: the ids the assembled model computed for ``inputs_embeds``;
* ``generate`` prompt pass: the same, repeated for beam search / several return sequences
  (transformers expands the batch with ``repeat_interleave``);
* KV-cache decode steps: the LM receives ``input_ids`` of newly generated tokens, which are
  text, so the ids are ``TEXT`` and the question mask is empty.

``decode_step`` tells tuners whether the current forward is a KV-cache decode step: the LM was
called with a KV cache that already holds tokens. That is the one signal that
holds for every way of calling the LM (``generate`` with any decoding strategy and beam count, a
hand-written loop): the prompt pass of ``generate`` also receives a
cache object, but an empty one, and a forward without a cache is never a decode step. (Judging by
``input_ids``-only calls would misread a text-only prompt pass.) It is sticky like the ids, so
gradient-checkpointing recomputation sees the value of its forward.

A caller with a plain model (no ``MultimodalLM``) supplies ids with ``set_modality_ids``, and
says there whether the forward is a decode step (no hook is installed on such a model).
"""

from __future__ import annotations

import torch
from torch import nn

from mllm.modality import Modality

CONTEXT_ATTR = "_mllm_modality_context"


class ModalityContext:
    def __init__(self):
        self.modality_ids: torch.Tensor | None = None    # (B, T) long, Modality values
        self.question_mask: torch.Tensor | None = None   # (B, T) bool
        #: The current LM forward extends a KV cache that already holds tokens (module docstring).
        self.decode_step: bool = False
        # What the next forward that receives `inputs_embeds` should publish.
        self._pending: tuple[torch.Tensor, torch.Tensor] | None = None

    def set(self, modality_ids: torch.Tensor, question_mask: torch.Tensor | None = None,
            decode_step: bool = False) -> None:
        if question_mask is None:
            question_mask = torch.zeros_like(modality_ids, dtype=torch.bool)
        if question_mask.shape != modality_ids.shape:
            raise ValueError(f"question_mask {tuple(question_mask.shape)} and modality_ids "
                             f"{tuple(modality_ids.shape)} differ in shape")
        self.modality_ids = modality_ids.long()
        self.question_mask = question_mask.bool()
        self.decode_step = decode_step

    def set_pending(self, modality_ids: torch.Tensor, question_mask: torch.Tensor | None = None) -> None:
        """Ids for the next forward that takes ``inputs_embeds`` (a training step or the
        prompt pass of ``generate``)."""
        if question_mask is None:
            question_mask = torch.zeros_like(modality_ids, dtype=torch.bool)
        self._pending = (modality_ids.long(), question_mask.bool())

    def clear(self) -> None:
        self.modality_ids = self.question_mask = self._pending = None
        self.decode_step = False

    # -- the hook ---------------------------------------------------------------------------
    def _pre_forward(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        decode_step = cached_length(kv_cache(kwargs)) > 0
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        inputs_embeds = kwargs.get("inputs_embeds")
        attention_mask = kwargs.get("attention_mask")
        if inputs_embeds is not None and self._pending is not None:
            ids, question = self._pending
            batch, length = inputs_embeds.shape[:2]
            if ids.shape[1] != length or batch % ids.shape[0]:
                raise ValueError(f"modality ids {tuple(ids.shape)} do not fit inputs_embeds "
                                 f"{tuple(inputs_embeds.shape[:2])}")
            repeat = batch // ids.shape[0]
            if repeat > 1:  # beam search / num_return_sequences
                ids, question = ids.repeat_interleave(repeat, 0), question.repeat_interleave(repeat, 0)
            self.set(ids.to(inputs_embeds.device), question.to(inputs_embeds.device), decode_step)
        elif input_ids is not None:
            # Tokens that arrive as ids are text: decode steps, or a text-only call.
            ids = torch.full_like(input_ids, int(Modality.TEXT))
            if attention_mask is not None and attention_mask.shape == input_ids.shape:
                ids = ids.masked_fill(attention_mask == 0, int(Modality.PAD))
            self.set(ids, decode_step=decode_step)
        else:
            # Caller-supplied ids (set_modality_ids) stay; only the decode flag follows the call.
            self.decode_step = decode_step


def kv_cache(forward_kwargs: dict):
    """The KV cache a causal LM's forward received: ``cache`` since transformers 5.24,
    ``past_key_values`` before (still accepted as an alias)."""
    cache = forward_kwargs.get("cache")
    return cache if cache is not None else forward_kwargs.get("past_key_values")


def cached_length(past_key_values) -> int:
    """Number of tokens already in a KV cache (0 for None or an empty cache)."""
    if past_key_values is None:
        return 0
    if hasattr(past_key_values, "get_seq_length"):
        return int(past_key_values.get_seq_length())
    # Legacy tuple-of-tuples format: (key, value) per layer, keys (B, heads, length, dim).
    if isinstance(past_key_values, (tuple, list)) and past_key_values and past_key_values[0] is not None:
        return int(past_key_values[0][0].shape[-2])
    return 0


def attach_modality_context(model: nn.Module, track_inputs: bool = True) -> ModalityContext:
    """Return the model's context, creating it on first use. With ``track_inputs`` a forward
    pre-hook publishes the right ids and ``decode_step`` on every call (see the module docstring);
    without it the caller sets them (``set_modality_ids``)."""
    context = getattr(model, CONTEXT_ATTR, None)
    if context is None:
        context = ModalityContext()
        # object.__setattr__: not an nn.Module attribute, so it is no submodule and not saved.
        object.__setattr__(model, CONTEXT_ATTR, context)
        if track_inputs:
            model.register_forward_pre_hook(context._pre_forward, with_kwargs=True)
    return context


def get_modality_context(model: nn.Module) -> ModalityContext | None:
    """Find the context on the model or on the model it wraps (peft, MultimodalLM)."""
    seen = set()
    while model is not None and id(model) not in seen:
        seen.add(id(model))
        context = getattr(model, CONTEXT_ATTR, None)
        if context is not None:
            return context
        inner = getattr(model, "base_model", None)
        inner = inner if isinstance(inner, nn.Module) and inner is not model else getattr(model, "model", None)
        model = inner if isinstance(inner, nn.Module) else None
    return None


def set_modality_ids(model: nn.Module, modality_ids: torch.Tensor,
                     question_mask: torch.Tensor | None = None, decode_step: bool = False) -> None:
    """For plain models (a CLIP dual encoder, a ViLT-style stream): the caller supplies the
    ids for the following forwards; they stay until set again. ``decode_step``: the forwards
    extend a KV cache that already holds tokens (e.g. partial-modality inference then leaves
    them alone)."""
    context = get_modality_context(model) or attach_modality_context(model, track_inputs=False)
    context.set(modality_ids, question_mask, decode_step)
