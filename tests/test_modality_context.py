"""DESIGN contract 2: every layer inside the LLM sees the right per-token modality ids and
question mask, in training, under gradient checkpointing, on the prompt pass of generate,
on KV-cache decode steps, with left padding and with beam search."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mllm.config import TunerConfig
from mllm.modality import Modality
from mllm.modality_context import get_modality_context, set_modality_ids


class Probe:
    """Records, at each call of an inner Linear, its input length and the published ids."""

    def __init__(self, model):
        self.context = get_modality_context(model.llm)
        self.calls = []
        layer = model.base_llm.model.layers[0].self_attn.q_proj
        self.handle = layer.register_forward_hook(self._record)

    def _record(self, module, args, output):
        x = args[0]
        self.calls.append((tuple(x.shape[:2]), self.context.modality_ids.clone(),
                           self.context.question_mask.clone()))

    def remove(self):
        self.handle.remove()


def _batch(model, padding_side):
    """Two prompts of different lengths, one image each, with a question mask."""
    img = model.placeholder_ids["<image>"]
    n_tok = model.num_media_tokens("<image>")
    tok = model.tokenizer
    rows, questions = [], []
    for words in ("what color", "where is the red circle"):
        question = tok(words, add_special_tokens=False)["input_ids"]
        rows.append([tok.bos_token_id] + [img] * n_tok + question)
        questions.append([False] * (1 + n_tok) + [True] * len(question))
    length = max(map(len, rows))
    input_ids = torch.full((2, length), tok.pad_token_id)
    attention = torch.zeros((2, length), dtype=torch.long)
    question_mask = torch.zeros((2, length), dtype=torch.bool)
    for i, (r, q) in enumerate(zip(rows, questions)):
        sl = slice(0, len(r)) if padding_side == "right" else slice(length - len(r), length)
        input_ids[i, sl] = torch.tensor(r)
        attention[i, sl] = 1
        question_mask[i, sl] = torch.tensor(q)
    return {"input_ids": input_ids, "attention_mask": attention, "question_mask": question_mask,
            "image_inputs": torch.randn(2, 3, 32, 32)}


def _expected(model, batch):
    ids = torch.full_like(batch["input_ids"], int(Modality.TEXT))
    ids[batch["input_ids"] == model.placeholder_ids["<image>"]] = int(Modality.VISUAL)
    ids[batch["attention_mask"] == 0] = int(Modality.PAD)
    return ids


def test_training_forward_sees_the_batch_ids(tiny_model):
    batch = _batch(tiny_model, "right")
    probe = Probe(tiny_model)
    tiny_model(**batch)
    probe.remove()
    (shape, ids, question), = probe.calls
    assert shape == tuple(batch["input_ids"].shape)
    assert torch.equal(ids, _expected(tiny_model, batch))
    assert torch.equal(question, batch["question_mask"])
    assert (ids == Modality.VISUAL).sum() == 2 * tiny_model.num_media_tokens("<image>")


@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing_recomputation_sees_the_same_ids(tiny_model, reentrant):
    tiny_model.apply_tuner(TunerConfig(r=2))
    tiny_model.train()
    tiny_model.gradient_checkpointing_enable({"use_reentrant": reentrant})
    batch = _batch(tiny_model, "right")
    labels = batch["input_ids"].masked_fill(_expected(tiny_model, batch) != Modality.TEXT, -100)
    probe = Probe(tiny_model)
    tiny_model(**batch, labels=labels).loss.backward()
    probe.remove()
    assert len(probe.calls) == 2, "the layer should run again during the backward recomputation"
    for shape, ids, question in probe.calls:
        assert torch.equal(ids, _expected(tiny_model, batch))
        assert torch.equal(question, batch["question_mask"])


@pytest.mark.parametrize("num_beams", [1, 2])
def test_generate_prompt_pass_and_decode_steps(tiny_model, num_beams):
    model = tiny_model.eval()
    batch = _batch(model, "left")
    probe = Probe(model)
    new = model.generate(**batch, max_new_tokens=3, min_new_tokens=3, do_sample=False,
                         num_beams=num_beams, num_return_sequences=num_beams)
    probe.remove()
    assert new.shape == (2 * num_beams, 3)
    (prompt_shape, prompt_ids, prompt_question), *steps = probe.calls
    expected = _expected(model, batch).repeat_interleave(num_beams, 0)
    assert prompt_shape == tuple(expected.shape)
    assert torch.equal(prompt_ids, expected)
    assert (prompt_ids[:, 0] == Modality.PAD).any(), "left padding should be marked PAD"
    assert torch.equal(prompt_question, batch["question_mask"].repeat_interleave(num_beams, 0))
    assert len(steps) == 2  # the first new token comes from the prompt pass
    for shape, ids, question in steps:
        assert shape == (2 * num_beams, 1)
        assert ids.shape == shape and bool((ids == Modality.TEXT).all())
        assert not question.any()


def test_plain_model_with_caller_supplied_ids():
    """Tuners can be used on any model: the caller publishes the ids itself."""
    model = nn.Sequential(nn.Linear(4, 4))
    ids = torch.tensor([[0, 1, 1, 2]])
    set_modality_ids(model, ids)
    context = get_modality_context(model)
    model(torch.randn(1, 4, 4))
    assert torch.equal(context.modality_ids, ids)
    assert not context.question_mask.any()


def test_decode_step_flag_follows_the_kv_cache(tiny_model):
    """``decode_step`` is set only for forwards that extend a non-empty KV cache: not for training
    forwards or the prompt pass of generate. With caller-supplied ids the caller states it."""
    model = tiny_model.eval()
    batch = _batch(model, "left")
    context = get_modality_context(model.llm)
    seen = []
    layer = model.base_llm.model.layers[0].self_attn.q_proj
    handle = layer.register_forward_hook(lambda *_: seen.append(context.decode_step))
    model(**batch)
    model.generate(**batch, max_new_tokens=3, min_new_tokens=3, do_sample=False)
    handle.remove()
    assert seen == [False, False, True, True]

    plain = nn.Sequential(nn.Linear(4, 4))
    set_modality_ids(plain, torch.zeros(1, 1, dtype=torch.long), decode_step=True)
    assert get_modality_context(plain).decode_step
    set_modality_ids(plain, torch.zeros(1, 3, dtype=torch.long))
    assert not get_modality_context(plain).decode_step
    assert not plain._forward_pre_hooks, "caller-supplied contexts install no hook"
