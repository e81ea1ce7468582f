"""Batched generation over a prompt dataset (left-padded, greedy by default)."""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from mllm.data.dataset import MultimodalCollator, MultimodalDataset
from mllm.model.multimodal_lm import MultimodalLM


@torch.no_grad()
def generate_answers(model: MultimodalLM, dataset: MultimodalDataset, batch_size: int = 16,
                     max_new_tokens: int = 16, progress: bool = True, **generate_kwargs) -> list[str]:
    """Generate one answer per prompt in ``dataset`` (built with ``for_generation=True``), in
    dataset order."""
    model.eval()
    collator = MultimodalCollator(model.tokenizer.pad_token_id, padding_side="left")
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collator)
    device = next(model.parameters()).device
    generate_kwargs.setdefault("do_sample", False)
    answers: list[str] = []
    for batch in tqdm(loader, desc="generating", disable=not progress, leave=False):
        batch = {k: v.to(device) for k, v in batch.items()}
        batch.pop("labels", None)
        new_tokens = model.generate(**batch, max_new_tokens=max_new_tokens, **generate_kwargs)
        answers.extend(model.tokenizer.decode(row, skip_special_tokens=True).strip() for row in new_tokens)
    return answers
