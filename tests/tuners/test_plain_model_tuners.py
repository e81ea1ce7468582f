"""MokA and DeLo on a plain model that no MultimodalLM manages (issue 13, items 3 and 4).

* A forward given ``input_ids`` and no published ids is all text: MokA is then exactly LoRA with
  its text A and B (paper section 3), DeLo routes every sample as text-only.
* A forward given only ``inputs_embeds`` keeps the clear "needs per-token modality ids" error.
* MokA takes 2-D inputs (batch, features) as one-token sequences.
* DeLo follows peft's LoRA for ``low_cpu_mem_usage`` loading and ``autocast_adapter_dtype=False``.
"""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model

import mllm  # noqa: F401  (registers the peft methods)
from mllm.modality_context import set_modality_ids
from mllm.tuners.delo import DeloConfig
from mllm.tuners.moka import MokaConfig
from tests.tuners.moka_helpers import OneLinear, T, V, tiny_llama

TARGETS = ["q_proj", "v_proj", "down_proj"]


def _input_ids(batch=2, length=7, seed=3):
    return torch.randint(3, 64, (batch, length), generator=torch.Generator().manual_seed(seed))


def _moka_llama(**kw):
    torch.manual_seed(5)
    config = MokaConfig(r=4, alpha=8, target_modules=TARGETS, init_weights=False,
                        modalities=["text", "visual", "audio"], modality_ranks={"visual": 2}, **kw)
    return get_peft_model(tiny_llama(0), config)


def test_moka_text_only_forward_on_a_plain_llama_equals_lora_with_its_text_a_and_b():
    moka = _moka_llama()
    lora = get_peft_model(tiny_llama(0), LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS))
    with torch.no_grad():
        for name, module in moka.named_modules():
            if hasattr(module, "moka_A"):
                layout = module.moka_layout["default"]
                columns = layout.text_b_columns or slice(None)
                twin = lora.get_submodule(name)
                twin.lora_A["default"].weight.copy_(module.moka_A["default"][layout.text_block])
                twin.lora_B["default"].weight.copy_(module.moka_B["default"][:, columns])
    input_ids = _input_ids()
    mask = torch.ones_like(input_ids)
    with torch.no_grad():
        got = moka(input_ids=input_ids, attention_mask=mask).logits
        want = lora(input_ids=input_ids, attention_mask=mask).logits
        base = lora.get_base_model()
        with lora.disable_adapter():
            plain = base(input_ids=input_ids).logits
    assert not torch.allclose(got, plain, atol=1e-4), "the adapter must change the output"
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_text_only_ids_follow_each_forward_and_caller_ids_take_precedence():
    moka = _moka_llama()
    first, second = _input_ids(2, 7), _input_ids(3, 4, seed=4)
    with torch.no_grad():
        moka(input_ids=first)
        out = moka(input_ids=second).logits                  # a new shape: ids follow the forward
        assert out.shape[:2] == (3, 4)
        # Ids the caller supplies win over the text default until cleared.
        ids = torch.full((3, 4), T)
        ids[:, 1] = V
        set_modality_ids(moka, ids)
        with_visual = moka(input_ids=second).logits
        set_modality_ids(moka, None)
        again = moka(input_ids=second).logits
    assert not torch.allclose(with_visual, out, atol=1e-5)
    torch.testing.assert_close(again, out)


@pytest.mark.parametrize("tuner", ["moka", "delo"])
def test_inputs_embeds_without_ids_keep_the_clear_error(tuner):
    model = _moka_llama() if tuner == "moka" else get_peft_model(
        tiny_llama(0), DeloConfig(r=2, num_experts=4, target_modules=TARGETS))
    input_ids = _input_ids()
    with torch.no_grad():
        model(input_ids=input_ids)   # derived text ids must not be reused by the next forward
        embeds = model.get_base_model().get_input_embeddings()(input_ids)
        with pytest.raises(RuntimeError, match="needs per-token modality ids"):
            model(inputs_embeds=embeds)


def test_media_beside_input_ids_is_not_taken_as_text():
    from mllm.modality_context import text_only_input_ids

    ids = _input_ids()
    assert text_only_input_ids((), {"input_ids": ids, "attention_mask": torch.ones_like(ids)}) is ids
    assert text_only_input_ids((ids,), {}) is ids
    assert text_only_input_ids((), {"input_ids": ids, "pixel_values": torch.randn(2, 3, 4, 4)}) is None
    assert text_only_input_ids((torch.randn(2, 7),), {}) is None     # features, not token ids


def test_delo_text_only_forward_on_a_plain_llama_equals_explicit_text_ids():
    torch.manual_seed(7)
    model = get_peft_model(tiny_llama(0), DeloConfig(r=2, num_experts=4, target_modules=TARGETS,
                                                     init_weights=False))
    input_ids = _input_ids()
    with torch.no_grad():
        derived = model(input_ids=input_ids).logits
        routes = model.base_model.state.routes
        set_modality_ids(model, torch.full(input_ids.shape, T))
        explicit = model(input_ids=input_ids).logits
        with model.disable_adapter():
            base = model(input_ids=input_ids).logits
    torch.testing.assert_close(derived, explicit)
    assert not torch.allclose(derived, base, atol=1e-4)
    # Text-only samples: guided routing gives the visual expert the text query (figure 2).
    torch.testing.assert_close(routes[0].query_visual, routes[0].query_text)


def test_moka_takes_2d_inputs_as_one_token_sequences():
    torch.manual_seed(0)
    model = get_peft_model(OneLinear(), MokaConfig(r=4, target_modules=["proj"], init_weights=False,
                                                   modalities=["text", "visual"], modality_ranks={"visual": 2}))
    x = torch.randn(5, 12)
    ids = torch.tensor([[T], [V], [T], [V], [V]])
    set_modality_ids(model, ids)
    with torch.no_grad():
        flat = model(x)
        set_modality_ids(model, ids.T)                       # the same tokens as one sequence
        sequence = model(x.unsqueeze(0))
    assert flat.shape == (5, 10)
    torch.testing.assert_close(flat, sequence.squeeze(0))


def _saved_delo(tmp_path):
    torch.manual_seed(11)
    model = get_peft_model(tiny_llama(0), DeloConfig(r=2, num_experts=4, target_modules=TARGETS,
                                                     init_weights=False))
    input_ids = _input_ids()
    with torch.no_grad():
        expected = model(input_ids=input_ids).logits
    model.save_pretrained(tmp_path)
    return input_ids, expected


def test_delo_loads_with_low_cpu_mem_usage(tmp_path):
    input_ids, expected = _saved_delo(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_llama(0), tmp_path, low_cpu_mem_usage=True)
    assert not [n for n, p in loaded.named_parameters() if p.device.type == "meta"]
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=input_ids).logits, expected)
    # load_adapter with low_cpu_mem_usage too: a second adapter, then switch to it.
    loaded.load_adapter(tmp_path, adapter_name="again", low_cpu_mem_usage=True)
    loaded.set_adapter("again")
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=input_ids).logits, expected)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("autocast", [False, True])
def test_delo_in_half_precision_follows_lora_adapter_dtype(dtype, autocast):
    torch.manual_seed(13)
    config = DeloConfig(r=2, num_experts=4, target_modules=TARGETS, init_weights=False)
    model = get_peft_model(tiny_llama(0, dtype=dtype), config, autocast_adapter_dtype=autocast)
    twin = get_peft_model(tiny_llama(0, dtype=dtype), LoraConfig(r=2, target_modules=TARGETS),
                          autocast_adapter_dtype=autocast)
    lora_dtypes = {p.dtype for n, p in twin.named_parameters() if "lora_" in n}
    assert {p.dtype for n, p in model.named_parameters() if "delo_" in n} == lora_dtypes
    assert lora_dtypes == ({torch.float32} if autocast else {dtype})
    assert model.base_model.delo_query["default"].keys.dtype == torch.float32   # the memory stays exact
    model.train()
    out = model(input_ids=_input_ids()).logits
    assert out.dtype == dtype and torch.isfinite(out).all()
    out.float().pow(2).mean().backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if p.requires_grad and "a_text" in n)


@pytest.mark.parametrize("tuner", ["moka", "delo"])
def test_unload_leaves_the_base_model_without_the_tracking_hook(tuner):
    base = tiny_llama(0)
    config = MokaConfig(r=4, target_modules=TARGETS) if tuner == "moka" else \
        DeloConfig(r=2, num_experts=4, target_modules=TARGETS)
    model = get_peft_model(base, config)
    with torch.no_grad():
        model(input_ids=_input_ids())
    plain = model.base_model.unload()
    assert plain is base and not plain._forward_pre_hooks
    from mllm.modality_context import get_modality_context

    assert get_modality_context(plain) is None
