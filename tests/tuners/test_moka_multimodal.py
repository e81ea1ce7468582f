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
from mllm.model import MultimodalLM
from mllm.modality import Modality
from tests.model.test_modality_context import _batch, _expected

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


def test_generation_with_and_without_kv_cache_is_equal(tiny_model):
    model = _tuned(tiny_model).eval()
    batch = _batch(model, "left")
    cached = _generate(model, batch, use_cache=True)
    uncached = _generate(model, batch, use_cache=False)
    assert torch.equal(cached, uncached)
    # The adapter matters for what is generated (routing actually runs).
    with model.llm.disable_adapter():
        base = model.llm(inputs_embeds=model.embed_inputs(batch["input_ids"], {"image_inputs": batch["image_inputs"]}),
                         attention_mask=batch["attention_mask"]).logits
    tuned = model(**batch).logits
    assert not torch.allclose(base, tuned, atol=1e-4)


def test_left_padded_batch_generates_what_each_prompt_generates_alone(tiny_model):
    model = _tuned(tiny_model).eval()
    batch = _batch(model, "left")
    together = _generate(model, batch)
    for i in range(2):
        keep = batch["attention_mask"][i].bool()
        alone = {k: (v[i : i + 1, keep] if k != "image_inputs" else v[i : i + 1]) for k, v in batch.items()}
        assert torch.equal(_generate(model, alone)[0], together[i]), f"prompt {i}"


def test_beam_search_and_several_return_sequences(tiny_model):
    model = _tuned(tiny_model).eval()
    batch = _batch(model, "left")
    beams = _generate(model, batch, num_beams=3, num_return_sequences=2)
    assert beams.shape == (4, 4)
    greedy_cached = _generate(model, batch, num_beams=3, num_return_sequences=2, use_cache=False)
    assert torch.equal(beams, greedy_cached)


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
