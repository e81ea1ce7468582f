"""Per-token modality ids for a ViLT backbone, published as each forward embeds its inputs.

ViLT runs one stream: ``ViltEmbeddings`` concatenates the text tokens and then the image tokens
(a CLS and the sampled patches, their number known only once the image is embedded). A forward
hook on the embeddings publishes, for the forward under way, TEXT for the text positions (PAD
where the attention mask is 0) and VISUAL for the rest, to the model's modality context, where
DeLo (or any tuner) reads them like the ids a ``MultimodalLM`` publishes.
"""

from __future__ import annotations

import torch
from torch import nn

from mllm.modality import Modality
from mllm.modality_context import attach_modality_context, get_modality_context


def publish_vilt_modality_ids(vilt: nn.Module):
    """Hook ``vilt`` (a ``ViltModel``, or a model holding one as ``.vilt``, possibly peft-wrapped)
    so every forward publishes its token modalities; returns the hook's handle."""
    embeddings = next((m for m in vilt.modules() if type(m).__name__ == "ViltEmbeddings"), None)
    if embeddings is None:
        raise TypeError(f"{type(vilt).__name__} holds no ViltEmbeddings")

    def publish(module, args, kwargs, output):
        embedded = output[0]
        text = kwargs.get("input_ids", args[0] if args else None)
        if text is None:
            text = kwargs.get("inputs_embeds", args[5] if len(args) > 5 else None)
        attention_mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
        batch, length = embedded.shape[:2]
        text_len = text.shape[1]
        ids = torch.full((batch, length), int(Modality.VISUAL), dtype=torch.long, device=embedded.device)
        ids[:, :text_len] = int(Modality.TEXT)
        if attention_mask is not None:
            ids[:, :text_len] = ids[:, :text_len].masked_fill(attention_mask.to(ids.device) == 0, int(Modality.PAD))
        context = get_modality_context(vilt) or attach_modality_context(vilt, track_inputs=False)
        context.set(ids)

    return embeddings.register_forward_hook(publish, with_kwargs=True)
