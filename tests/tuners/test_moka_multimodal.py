"""MokA inside the assembled MultimodalLM: routing from the published modality ids in training,
gradient checkpointing, generate (KV cache, left padding, beams) and stage-2 save/load."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from mllm.config import TunerConfig
from mllm.modality import Modality
from mllm.model.splice import position_ids_from_attention_mask
from tests.test_modality_context import _batch, _expected

MOKA = dict(type="moka", r=2, alpha=4, dropout=0.0,
            options={"modalities": ["text", "visual"], "init_weights": False, "strengths": {"visual": 0.8}})


def _tuned(model, **options):
    model.freeze_llm()
    model.apply_tuner(TunerConfig(**{**MOKA, "options": {**MOKA["options"], **options}}))
    return model


def _loss(model, batch):
    labels = batch["input_ids"].masked_fill(_expected(model, batch) != Modality.TEXT, -100)
    return model(**batch, labels=labels).loss


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_only_adapter_and_projector_parameters_receive_gradients(tiny_model):
    model = _tuned(tiny_model).train()
    _loss(model, _batch(model, "right")).backward()
    grads = _grads(model)
    assert grads, "nothing received a gradient"
    for name in grads:
        assert "moka_" in name or name.startswith("projectors."), name
    assert any("moka_A" in n for n in grads) and any("moka_B" in n for n in grads)
    assert any(n.startswith("projectors.") for n in grads)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert all("moka_" in n or n.startswith("projectors.") for n in trainable)


@pytest.mark.parametrize("reentrant", [False, True])
def test_gradients_equal_with_and_without_gradient_checkpointing(tiny_model, reentrant):
    model = _tuned(tiny_model).train()
    batch = _batch(model, "right")
    _loss(model, batch).backward()
    plain = _grads(model)
    model.zero_grad(set_to_none=True)
    model.gradient_checkpointing_enable({"use_reentrant": reentrant})
    _loss(model, batch).backward()
    checkpointed = _grads(model)
    assert plain.keys() == checkpointed.keys()
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-5, atol=1e-6, msg=name)


def _generate(model, batch, **kw):
    kw = {"max_new_tokens": 4, "min_new_tokens": 4, "do_sample": False, **kw}
    return model.generate(**batch, **kw)


def _greedy_without_cache(model, batch, new_tokens):
    """Greedy decoding by hand with no KV cache: every step re-forwards the whole sequence (the
    prompt's embeddings + the generated tokens' embeddings) with the modality ids of the whole
    sequence (the prompt's media ids, TEXT for generated tokens) and the prompt's question mask
    (generated tokens are no question). Returns (tokens (B, new), logits of the first step)."""
    mask = batch["attention_mask"]
    embeds = model.embed_inputs(batch["input_ids"], {"image_inputs": batch["image_inputs"]})
    ids = model.modality_ids(batch["input_ids"], mask)
    question = batch["question_mask"]
    embedding = model.llm.get_input_embeddings()
    tokens, first = [], None
    with torch.no_grad():
        for _ in range(new_tokens):
            model.modality_context.set_pending(ids, question)
            logits = model.llm(inputs_embeds=embeds, attention_mask=mask, use_cache=False,
                               position_ids=position_ids_from_attention_mask(mask)).logits
            first = logits if first is None else first
            assert model.modality_context.modality_ids is not None and not model.modality_context.decode_step
            tokens.append(logits[:, -1].argmax(-1, keepdim=True))
            embeds = torch.cat([embeds, embedding(tokens[-1])], dim=1)
            ids = torch.cat([ids, torch.full_like(tokens[-1], int(Modality.TEXT))], dim=1)
            question = torch.cat([question, torch.zeros_like(tokens[-1], dtype=torch.bool)], dim=1)
            mask = torch.cat([mask, torch.ones_like(tokens[-1])], dim=1)
    return torch.cat(tokens, dim=-1), first


def test_generation_with_and_without_kv_cache_is_equal(tiny_model):
    """generate() (prompt pass + KV-cache decode steps) == a greedy loop without any cache.

    ``generate`` cannot be asked for ``use_cache=False`` here: given ``inputs_embeds`` transformers
    keeps the cache on, so the uncached side is a hand-written loop that re-forwards the full
    sequence with the full sequence's modality ids at every step. Cross-attention is on, the
    prompts carry an image and are left-padded, and B is non-zero, so wrong routing on the decode
    steps (e.g. a generated token taken for a question token or a media token, or no adapter on
    it) changes the tokens."""
    model = _tuned(tiny_model).eval()
    assert model.llm.peft_config["default"].cross_attention == "task_centric"
    batch = _batch(model, "left")
    assert (batch["attention_mask"] == 0).any(), "one prompt should be left-padded"
    new_tokens = 6
    cached = _generate(model, batch, max_new_tokens=new_tokens, min_new_tokens=new_tokens)
    uncached, first_logits = _greedy_without_cache(model, batch, new_tokens)
    assert cached.shape == uncached.shape == (2, new_tokens)
    assert torch.equal(cached, uncached)
    # The adapter matters for what is generated: the same loop's logits without it differ.
    with model.llm.disable_adapter():
        _, base_logits = _greedy_without_cache(model, batch, new_tokens)
    real = batch["attention_mask"].bool()
    assert not torch.allclose(base_logits[real], first_logits[real], atol=1e-3)


def test_left_padded_batch_generates_what_each_prompt_generates_alone(tiny_model):
    model = _tuned(tiny_model).eval()
    batch = _batch(model, "left")
    together = _generate(model, batch)
    for i in range(2):
        assert torch.equal(_generate(model, _alone(batch, i))[0], together[i]), f"prompt {i}"


def _alone(batch, i):
    """Prompt i of a left-padded batch as a batch of one, without its padding."""
    keep = batch["attention_mask"][i].bool()
    return {k: (v[i : i + 1, keep] if k != "image_inputs" else v[i : i + 1]) for k, v in batch.items()}


@pytest.mark.parametrize("num_beams", [2, 3])
def test_beam_search_and_several_return_sequences(tiny_model, num_beams):
    """Beam search with several return sequences: a left-padded batch gives each prompt the beams
    it gets alone in a batch of one. transformers repeats each prompt num_beams times; the
    prompt's ids must follow its copies (with 2 beams, routing the copies in the wrong order
    hands the second prompt's first beam the first prompt's ids)."""
    model = _tuned(tiny_model).eval()
    batch = _batch(model, "left")
    kw = {"num_beams": num_beams, "num_return_sequences": 2}
    beams = _generate(model, batch, **kw)
    assert beams.shape == (4, 4)
    for i in range(2):
        alone = _generate(model, _alone(batch, i), **kw)
        assert alone.shape == (2, 4)
        assert torch.equal(beams[2 * i : 2 * i + 2], alone), f"prompt {i}"
    # The adapter changes the search (so the comparison above exercises the routing).
    with model.llm.disable_adapter():
        base_beams = _generate(model, batch, **kw)
    assert not torch.equal(base_beams, beams)


def test_stage2_checkpoint_reloads_in_a_fresh_process_with_identical_logits(tiny_model, tmp_path):
    model = _tuned(tiny_model).eval()
    batch = _batch(model, "right")
    with torch.no_grad():
        logits = model(**batch).logits
    out = tmp_path / "ckpt"
    model.save_pretrained(str(out))
    torch.save({"batch": batch, "logits": logits}, tmp_path / "expected.pt")
    assert '"peft_type": "MOKA"' in next(out.rglob("adapter_config.json")).read_text()
    script = textwrap.dedent(f"""
        import torch
        from mllm.model import MultimodalLM
        saved = torch.load({str(tmp_path / 'expected.pt')!r})
        model = MultimodalLM.from_pretrained({str(out)!r})
        with torch.no_grad():
            logits = model(**saved["batch"]).logits
        torch.testing.assert_close(logits, saved["logits"], rtol=1e-5, atol=1e-5)
        assert type(model.llm.base_model).__name__ == "MokaModel"
        print("OK")
    """)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0 and "OK" in done.stdout, done.stderr[-3000:]


class _LayerRecorder:
    """Records the input, output and published ids of one MokA Linear at every call."""

    def __init__(self, model):
        self.layer = model.base_llm.model.layers[0].self_attn.q_proj
        self.context = model.modality_context
        self.calls = []
        self.handle = self.layer.register_forward_hook(self._record)

    def _record(self, module, args, output):
        self.calls.append((args[0].detach(), output.detach(), self.context.modality_ids.clone(),
                           self.context.decode_step))

    def remove(self):
        self.handle.remove()


def test_partial_modality_restricts_only_the_prompt_pass(tiny_model):
    """Section 4.3: only visual tokens go through the adapter on the prompt pass; the decode
    steps' text tokens get the usual text-A output (not the base output)."""
    model = _tuned(tiny_model).eval()
    batch = _batch(model, "left")
    recorder = _LayerRecorder(model)
    with model.llm.base_model.partial_modality("visual"):
        _generate(model, batch, max_new_tokens=3, min_new_tokens=3)
    recorder.remove()
    layer = recorder.layer
    layout, scaling = layer.moka_layout["default"], layer.scaling["default"]
    weight_A, weight_B = layer.moka_A["default"].detach(), layer.moka_B["default"].detach()
    A_text, A_visual = (weight_A[layout.block(layout.modalities.index(m))] for m in ("text", "visual"))

    (x, out, ids, decode), *steps = recorder.calls
    assert not decode and (ids == Modality.VISUAL).any() and (ids == Modality.TEXT).any()
    visual = (ids == Modality.VISUAL).unsqueeze(-1)
    # Visual tokens: s * B A_visual x, without the cross-modal term; every other token: none.
    expected = layer.base_layer(x) + torch.where(visual, scaling * (x @ A_visual.T) @ weight_B.T, 0.0)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)

    assert len(steps) == 2
    for x, out, ids, decode in steps:
        assert decode and x.shape[1] == 1 and bool((ids == Modality.TEXT).all())
        base = layer.base_layer(x)
        torch.testing.assert_close(out, base + scaling * (x @ A_text.T) @ weight_B.T, rtol=1e-5, atol=1e-6)
        assert not torch.allclose(out, base, atol=1e-4), "decode steps must keep the text adapter output"


def test_partial_modality_generation_equals_a_hand_written_greedy_loop(tiny_model):
    """generate() under partial_modality == a loop whose prompt pass alone runs partial routing."""
    from transformers import DynamicCache

    model = _tuned(tiny_model).eval()
    batch = _batch(model, "left")
    moka = model.llm.base_model
    new_tokens = 4
    with moka.partial_modality("visual"):
        generated = _generate(model, batch, max_new_tokens=new_tokens, min_new_tokens=new_tokens)

    mask = batch["attention_mask"]
    embeds = model.embed_inputs(batch["input_ids"], {"image_inputs": batch["image_inputs"]})
    model.modality_context.set_pending(model.modality_ids(batch["input_ids"], mask), batch["question_mask"])
    cache, tokens = DynamicCache(), []
    with torch.no_grad():
        with moka.partial_modality("visual"):
            logits = model.llm(inputs_embeds=embeds, attention_mask=mask, cache=cache, use_cache=True,
                               position_ids=position_ids_from_attention_mask(mask)).logits
        for _ in range(new_tokens):
            tokens.append(logits[:, -1].argmax(-1, keepdim=True))
            position = mask.sum(-1, keepdim=True)          # the new token follows the real ones
            mask = torch.cat([mask, torch.ones_like(tokens[-1])], dim=-1)
            logits = model.llm(input_ids=tokens[-1], attention_mask=mask, cache=cache, use_cache=True,
                               position_ids=position).logits
    assert torch.equal(generated, torch.cat(tokens, dim=-1))
