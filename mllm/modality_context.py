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
  text, so the ids are ``TEXT`` and the question mask is empty (whatever else the step carries).

``decode_step`` tells tuners whether the current forward is a KV-cache decode step: the LM was
called with a KV cache that already holds tokens. That is the one signal that
holds for every way of calling the LM (``generate`` with any decoding strategy and beam count, a
hand-written loop): the prompt pass of ``generate`` also receives a
cache object, but an empty one, and a forward without a cache is never a decode step. (Judging by
``input_ids``-only calls would misread a text-only prompt pass.) It is sticky like the ids, so
gradient-checkpointing recomputation sees the value of its forward.

Packed rows (``data.packing``) also publish ``segment_ids``: each token's sample within its row,
so that tuners keep their per-sample work (MokA's question keys, DeLo's routing) inside a sample.

A plain model (no ``MultimodalLM``) gets a tracking context from the tuner (MokA, DeLo) that reads
the ids. With no ``MultimodalLM`` publishing pending ids, what a forward publishes is, in order:

* ids the caller supplied with ``set_modality_ids`` (they stay until set again or cleared with
  ``set_modality_ids(model, None)``; the caller also says there whether the forward is a decode
  step);
* every token TEXT (PAD where the attention mask is 0) when the forward receives integer
  ``input_ids`` and no other input that could carry media (``pixel_values``, ``input_features``,
  a float tensor, ...): tokens that arrive as ids are text, and a model with a single modality
  is a text model (MokA with one modality is LoRA, paper section 3);
* nothing otherwise -- e.g. a forward given only ``inputs_embeds``, where media could be hidden in
  the embeddings: the tuner layer then raises its clear "needs per-token modality ids" error
  rather than guess.
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
        #: Packed rows (``data.packing``): (B, T) long, each token's sample within its row (0, 1, ...),
        #: -1 on padding; None when every row is one sample. Tuners keep per-sample work inside it.
        self.segment_ids: torch.Tensor | None = None
        #: The current LM forward extends a KV cache that already holds tokens (module docstring).
        self.decode_step: bool = False
        # What the next forward that receives `inputs_embeds` should publish.
        self._pending: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None = None
        #: The ids were supplied by the caller (set_modality_ids): they stay until set again.
        self.caller_supplied: bool = False
        self._hook = None   # the forward pre-hook's handle on a tracking context
        self.tuner_attached = False   # created or hooked by a tuner (tracking_context)
        #: Counts publications: a reader that noted ``step`` before a forward can tell ids published
        #: during it (fresh) from ids left over from an earlier one (stale).
        self.step = 0

    def set(self, modality_ids: torch.Tensor, question_mask: torch.Tensor | None = None,
            decode_step: bool = False, segment_ids: torch.Tensor | None = None) -> None:
        if question_mask is None:
            question_mask = torch.zeros_like(modality_ids, dtype=torch.bool)
        for name, value in (("question_mask", question_mask), ("segment_ids", segment_ids)):
            if value is not None and value.shape != modality_ids.shape:
                raise ValueError(f"{name} {tuple(value.shape)} and modality_ids "
                                 f"{tuple(modality_ids.shape)} differ in shape")
        self.modality_ids = modality_ids.long()
        self.question_mask = question_mask.bool()
        self.segment_ids = None if segment_ids is None else segment_ids.long()
        self.decode_step = decode_step
        self.step += 1

    def set_pending(self, modality_ids: torch.Tensor, question_mask: torch.Tensor | None = None,
                    segment_ids: torch.Tensor | None = None) -> None:
        """Ids for the next forward that takes ``inputs_embeds`` (a training step or the
        prompt pass of ``generate``)."""
        if question_mask is None:
            question_mask = torch.zeros_like(modality_ids, dtype=torch.bool)
        self._pending = (modality_ids.long(), question_mask.bool(),
                         None if segment_ids is None else segment_ids.long())

    def supply(self, modality_ids: torch.Tensor | None, question_mask: torch.Tensor | None = None,
               decode_step: bool = False, segment_ids: torch.Tensor | None = None) -> None:
        """Caller-supplied ids (``set_modality_ids``), sticky until supplied again; None goes back
        to what each forward's inputs give (module docstring)."""
        if modality_ids is None:
            self.modality_ids = self.question_mask = self.segment_ids = None
            self.caller_supplied, self.decode_step = False, decode_step
            self.step += 1
            return
        self.set(modality_ids, question_mask, decode_step, segment_ids)
        self.caller_supplied = True

    def published_since(self, step: int) -> bool:
        """Ids that hold for the forward started after ``step`` was read: published during it, or
        supplied by the caller for every following forward (``set_modality_ids``)."""
        return self.modality_ids is not None and (self.step > step or self.caller_supplied)

    def clear(self) -> None:
        self.modality_ids = self.question_mask = self.segment_ids = self._pending = None
        self.decode_step = False
        self.caller_supplied = False

    # -- the hook ---------------------------------------------------------------------------
    def _pre_forward(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        decode_step = cached_length(kv_cache(kwargs)) > 0
        inputs_embeds = kwargs.get("inputs_embeds")
        if inputs_embeds is not None and self._pending is not None:
            ids, question, segments = self._pending
            batch, length = inputs_embeds.shape[:2]
            if ids.shape[1] != length or batch % ids.shape[0]:
                raise ValueError(f"modality ids {tuple(ids.shape)} do not fit inputs_embeds "
                                 f"{tuple(inputs_embeds.shape[:2])}")
            repeat = batch // ids.shape[0]
            if repeat > 1:  # beam search / num_return_sequences
                ids, question = ids.repeat_interleave(repeat, 0), question.repeat_interleave(repeat, 0)
                segments = None if segments is None else segments.repeat_interleave(repeat, 0)
            device = inputs_embeds.device
            self.set(ids.to(device), question.to(device), decode_step,
                     None if segments is None else segments.to(device))
            return
        if self.caller_supplied:
            return  # set_modality_ids: the caller's ids (and decode flag) stay until set again
        input_ids = text_only_input_ids(args, kwargs)
        if input_ids is None and decode_step:
            # A KV-cache decode step forwards the tokens just generated: text, whatever else rides
            # along (a native VLM's mm_token_type_ids or image grids describe the cached prompt).
            input_ids = kwargs.get("input_ids", args[0] if args else None)
            input_ids = input_ids if torch.is_tensor(input_ids) and not input_ids.is_floating_point() else None
        if input_ids is not None:
            # Tokens that arrive as ids, with nothing beside them that could carry media, are text:
            # decode steps, or a text-only call.
            ids = torch.full_like(input_ids, int(Modality.TEXT))
            attention_mask = kwargs.get("attention_mask")
            if attention_mask is not None and attention_mask.shape == input_ids.shape:
                ids = ids.masked_fill(attention_mask == 0, int(Modality.PAD))
            self.set(ids, decode_step=decode_step)
        else:
            # Nothing to read the ids from (e.g. only inputs_embeds): publish none, so that a tuner
            # raises its clear error instead of reusing an earlier forward's ids.
            self.modality_ids = self.question_mask = self.segment_ids = None
            self.decode_step = decode_step
            self.step += 1


#: Keyword inputs of a causal LM's forward that carry no media (anything else that is a tensor might).
_TEXT_ONLY_INPUTS = frozenset({"input_ids", "attention_mask", "position_ids", "token_type_ids", "labels",
                               "cache_position", "logits_to_keep", "cache", "past_key_values"})


def text_only_input_ids(args: tuple, kwargs: dict) -> torch.Tensor | None:
    """The forward's integer ``input_ids`` (keyword or first positional argument) when no other
    input could carry media: no ``inputs_embeds``, no other tensor keyword (``pixel_values``,
    ``input_features``, ...) and no floating-point positional tensor. None otherwise."""
    input_ids = kwargs.get("input_ids", args[0] if args else None)
    if not torch.is_tensor(input_ids) or input_ids.is_floating_point() or input_ids.dim() != 2:
        return None
    if any(torch.is_tensor(value) and name not in _TEXT_ONLY_INPUTS for name, value in kwargs.items()):
        return None
    if any(torch.is_tensor(value) and value.is_floating_point() for value in args[1:]):
        return None
    return input_ids


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
    pre-hook publishes the right ids and ``decode_step`` on every call (see the module docstring),
    also on a context that existed without one; without it the caller sets them
    (``set_modality_ids``)."""
    context = getattr(model, CONTEXT_ATTR, None)
    if context is None:
        context = ModalityContext()
        # object.__setattr__: not an nn.Module attribute, so it is no submodule and not saved.
        object.__setattr__(model, CONTEXT_ATTR, context)
    if track_inputs and context._hook is None:
        context._hook = model.register_forward_pre_hook(context._pre_forward, with_kwargs=True)
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


def tracking_context(model: nn.Module) -> ModalityContext:
    """The context a tuner on ``model`` reads: the one already on the model or on a model it wraps
    (a ``MultimodalLM`` attaches one to its LLM), else a new tracking context on ``model``. A
    context on ``model`` itself that has no hook yet (ids supplied before the tuner came) gets the
    tracking hook, so forwards without caller-supplied ids publish what their inputs give."""
    context = get_modality_context(model)
    if context is None or getattr(model, CONTEXT_ATTR, None) is context:
        hooked = context is not None and context._hook is not None
        context = attach_modality_context(model)
        context.tuner_attached = context.tuner_attached or not hooked
    return context


def release_tracking_context(model: nn.Module) -> None:
    """Undo ``tracking_context`` when its tuner is unloaded: the hook (and the context) it put on
    ``model`` go, so the returned base model runs as it did before. A context a ``MultimodalLM``
    attached stays."""
    context = getattr(model, CONTEXT_ATTR, None)
    if context is None or not context.tuner_attached:
        return
    if context._hook is not None:
        context._hook.remove()
    del model.__dict__[CONTEXT_ATTR]


def set_modality_ids(model: nn.Module, modality_ids: torch.Tensor | None,
                     question_mask: torch.Tensor | None = None, decode_step: bool = False,
                     segment_ids: torch.Tensor | None = None) -> None:
    """For plain models (a CLIP dual encoder, a ViLT-style stream): the caller supplies the
    ids for the following forwards; they stay until set again (None: back to what each forward's
    inputs give, see the module docstring). ``decode_step``: the forwards extend a KV cache that
    already holds tokens (e.g. partial-modality inference then leaves them alone).
    ``segment_ids``: packed rows' sample of each token (``ModalityContext.segment_ids``)."""
    context = get_modality_context(model) or attach_modality_context(model, track_inputs=False)
    context.supply(modality_ids, question_mask, decode_step, segment_ids)
