"""MokA's layer math and routing against peft LoRA and against a per-token oracle (eqs 4-13)."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model

import mllm  # noqa: F401  (registers moka with peft)
from mllm.model import set_modality_ids
from mllm.tuners.moka import MokaConfig
from tests.tuners.moka_helpers import A, P, T, V, OneLinear, moka_oracle, sample_ids, tiny_llama

TARGETS = ["q_proj", "v_proj", "down_proj"]


def _moka(model, **kw):
    kw.setdefault("target_modules", ["proj"])
    kw.setdefault("init_weights", False)
    return get_peft_model(model, MokaConfig(**kw))


def _layer(peft_model):
    return peft_model.base_model.model.proj


def _blocks(layer, name="default"):
    layout = layer.moka_layout[name]
    weight = layer.moka_A[name].detach()
    return {m: weight[layout.block(i)] for i, m in enumerate(layout.modalities)}


def test_all_text_equals_peft_lora_with_same_A_and_B():
    torch.manual_seed(0)
    base = tiny_llama()
    input_ids = torch.randint(3, 64, (2, 9))
    lora = get_peft_model(tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS,
                                                   init_lora_weights=False))
    moka = get_peft_model(base, MokaConfig(r=4, alpha=8, target_modules=TARGETS, init_weights=False))
    for name, module in moka.base_model.model.named_modules():
        if hasattr(module, "moka_A"):
            lora_layer = lora.base_model.model.get_submodule(name)
            block = module.moka_layout["default"].block(module.moka_layout["default"].text_slot)
            with torch.no_grad():
                module.moka_A["default"][block] = lora_layer.lora_A["default"].weight
                module.moka_B["default"].copy_(lora_layer.lora_B["default"].weight)
    set_modality_ids(moka, torch.full((2, 9), T))
    with torch.no_grad():
        expected = lora(input_ids=input_ids).logits
        got = moka(input_ids=input_ids).logits
        with moka.disable_adapter():
            base_logits = moka(input_ids=input_ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got, base_logits, atol=1e-3)


def test_strength_zero_equals_per_modality_lora_by_hand():
    torch.manual_seed(1)
    model = _moka(OneLinear(), r=4, alpha=8, modalities=["text", "visual", "audio"],
                  strengths={"visual": 0.0, "audio": 0.0})
    layer = _layer(model)
    ids, question = sample_ids()
    x = torch.randn(2, 10, 12)
    set_modality_ids(model, ids, question)
    blocks, B = _blocks(layer), layer.moka_B["default"].detach()
    expected = layer.base_layer(x).detach()
    for b in range(2):
        for t in range(10):
            if ids[b, t] != P:
                name = {T: "text", V: "visual", A: "audio"}[int(ids[b, t])]
                expected[b, t] += 2.0 * B @ (blocks[name] @ x[b, t])
    torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("ranks", [None, {"visual": 2, "audio": 3}])
def test_cross_attention_matches_per_token_oracle(ranks):
    torch.manual_seed(2)
    strengths = {"visual": 0.7, "audio": 1.3}
    model = _moka(OneLinear(), r=4, alpha=8, modalities=["text", "visual", "audio"], modality_ranks=ranks,
                  strengths=strengths)
    layer = _layer(model)
    ids, question = sample_ids()
    x = torch.randn(2, 10, 12)
    set_modality_ids(model, ids, question)
    expected = layer.base_layer(x) + moka_oracle(x, ids, question, _blocks(layer), layer.moka_B["default"],
                                                 2.0, strengths, r=4)
    torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("ranks", [None, {"visual": 2, "audio": 3}])
def test_gradients_match_the_per_token_oracle(ranks):
    torch.manual_seed(10)
    strengths = {"visual": 0.7, "audio": 1.3}
    model = _moka(OneLinear(), r=4, alpha=8, modalities=["text", "visual", "audio"], modality_ranks=ranks,
                  strengths=strengths)
    layer = _layer(model)
    ids, question = sample_ids()
    x = torch.randn(2, 10, 12)
    target = torch.randn(2, 10, 10)
    set_modality_ids(model, ids, question)
    weight_A, weight_B = layer.moka_A["default"], layer.moka_B["default"]
    (model(x) * target).sum().backward()
    got = weight_A.grad.clone(), weight_B.grad.clone()
    layout = layer.moka_layout["default"]
    blocks = {m: weight_A[layout.block(i)] for i, m in enumerate(layout.modalities)}
    expected = torch.autograd.grad((moka_oracle(x, ids, question, blocks, weight_B, 2.0, strengths, r=4) * target).sum(),
                                   (weight_A, weight_B))
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)


def test_cross_attention_when_one_sample_has_no_question_tokens():
    # The compact key set is padded to the largest count; a sample without keys gets no term and
    # no NaN from an all-masked softmax row.
    torch.manual_seed(9)
    strengths = {"visual": 0.7, "audio": 1.3}
    model = _moka(OneLinear(), r=4, alpha=8, modalities=["text", "visual", "audio"], strengths=strengths)
    layer = _layer(model)
    ids, question = sample_ids()
    question[1] = False
    x = torch.randn(2, 10, 12)
    set_modality_ids(model, ids, question)
    out = model(x)
    expected = layer.base_layer(x) + moka_oracle(x, ids, question, _blocks(layer), layer.moka_B["default"],
                                                 2.0, strengths, r=4)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    out.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)


def test_pad_positions_get_no_adapter_output_and_no_question_means_no_attention():
    torch.manual_seed(3)
    model = _moka(OneLinear(), r=4, modalities=["text", "visual", "audio"])
    ids, _ = sample_ids()
    x = torch.randn(2, 10, 12)
    set_modality_ids(model, ids)  # no question tokens: cross-attention has no keys
    out = model(x)
    base = _layer(model).base_layer(x)
    torch.testing.assert_close(out[1, :2], base[1, :2])
    assert not torch.allclose(out[0], base[0])
    layer = _layer(model)
    no_ca = moka_oracle(x, ids, torch.zeros_like(ids, dtype=torch.bool), _blocks(layer), layer.moka_B["default"],
                        layer.scaling["default"], {}, r=4)
    torch.testing.assert_close(out, base + no_ca, rtol=1e-5, atol=1e-5)


def test_unknown_modality_and_stale_ids_raise():
    model = _moka(OneLinear(), r=4, modalities=["text", "visual"])
    set_modality_ids(model, torch.tensor([[T, A]]))
    with pytest.raises(ValueError, match="audio"):
        model(torch.randn(1, 2, 12))
    set_modality_ids(model, torch.tensor([[T, T, T]]))
    with pytest.raises(RuntimeError, match="do not match"):
        model(torch.randn(1, 2, 12))


def test_init_is_identity_and_A_is_kaiming_uniform():
    torch.manual_seed(4)
    model = _moka(OneLinear(d_in=256), init_weights=True, r=8)
    layer = _layer(model)
    weight = layer.moka_A["default"].detach()
    bound = 1 / 256 ** 0.5  # kaiming_uniform(a=sqrt(5)) -> U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    assert weight.shape == (4 * 8, 256)
    assert weight.abs().max() <= bound and weight.abs().max() > 0.9 * bound
    assert torch.count_nonzero(layer.moka_B["default"]) == 0
    assert layer.scaling["default"] == 16 / 8
    ids, question = sample_ids()
    set_modality_ids(model, torch.where(ids == P, T, ids), question)
    x = torch.randn(2, 10, 256)
    torch.testing.assert_close(model(x), layer.base_layer(x))


@pytest.mark.parametrize("mode", ["none", "text_queries", "naive", "projected"])
def test_interaction_variants(mode):
    torch.manual_seed(5)
    model = _moka(OneLinear(), r=4, modalities=["text", "visual", "audio"], cross_attention=mode)
    layer = _layer(model)
    ids, question = sample_ids()
    x = torch.randn(2, 10, 12)
    set_modality_ids(model, ids, question)
    out = model(x)
    blocks, B, s = _blocks(layer), layer.moka_B["default"].detach(), layer.scaling["default"]
    plain = layer.base_layer(x) + moka_oracle(x, ids, question, blocks, B, s, {}, r=4, mode="none")
    if mode == "none":
        torch.testing.assert_close(out, plain, rtol=1e-5, atol=1e-5)
    elif mode == "projected":
        # Identity-initialised projections start at plain MokA.
        ref = layer.base_layer(x) + moka_oracle(x, ids, question, blocks, B, s,
                                                {"visual": 1.0, "audio": 1.0}, r=4)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
        assert {"moka_query", "moka_key", "moka_value"} <= {n.split(".")[-2] for n, _ in model.named_parameters()}
    elif mode == "naive":
        # Non-text code + mean of the question codes; text tokens unchanged.
        expected = plain.clone()
        for b in range(2):
            keys = [t for t in range(10) if question[b, t]]
            mean = torch.stack([blocks["text"] @ x[b, j] for j in keys]).mean(0)
            for t in range(10):
                if ids[b, t] in (V, A):
                    expected[b, t] += s * B @ mean
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    else:  # text_queries: only question tokens change
        changed = ~torch.isclose(out, plain, atol=1e-6).all(-1)
        assert torch.equal(changed, question)


@pytest.mark.parametrize("variant", ["unimodal_lora", "multiple_lora", "uni_mm_lora", "uni_mm_lora_gate"])
def test_baseline_variants_by_hand(variant):
    torch.manual_seed(6)
    model = _moka(OneLinear(), r=2, modalities=["text", "visual", "audio"], variant=variant)
    layer = _layer(model)
    ids, question = sample_ids()
    x = torch.randn(2, 10, 12)
    set_modality_ids(model, ids, question)
    out = model(x)
    W_A, W_B, s = layer.moka_A["default"].detach(), layer.moka_B["default"].detach(), layer.scaling["default"]
    slot = {T: 0, V: 1, A: 2}
    expected = layer.base_layer(x).detach()
    for b in range(2):
        for t in range(10):
            if ids[b, t] == P:
                continue
            xt = x[b, t]
            rows = slice(2 * slot[int(ids[b, t])], 2 * slot[int(ids[b, t])] + 2)
            uni = W_B[:, rows] @ (W_A[rows] @ xt)
            mm = W_B[:, 6:8] @ (W_A[6:8] @ xt) if variant.startswith("uni_mm") else None
            if variant == "unimodal_lora":
                delta = uni
            elif variant == "multiple_lora":
                delta = W_B @ (W_A @ xt)   # 3 LoRAs of rank 2, summed
            elif variant == "uni_mm_lora":
                delta = uni + mm
            else:
                g = torch.sigmoid(layer.moka_gate["default"].detach() @ xt)
                delta = g * uni + (1 - g) * mm
            expected[b, t] += s * delta
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_partial_modality_inference_lets_one_modality_through():
    torch.manual_seed(7)
    model = _moka(OneLinear(), r=4, modalities=["text", "visual", "audio"], cross_attention="none")
    ids, question = sample_ids()
    x = torch.randn(2, 10, 12)
    set_modality_ids(model, ids, question)
    full, base = model(x), _layer(model).base_layer(x)
    with model.base_model.partial_modality("visual"):
        part = model(x)
    visual = (ids == V).unsqueeze(-1)
    torch.testing.assert_close(part, torch.where(visual, full, base))
    torch.testing.assert_close(model(x), full)


def test_merge_raises_and_unload_restores_base():
    model = _moka(OneLinear(), r=4)
    set_modality_ids(model, torch.tensor([[T, V]]))
    x = torch.randn(1, 2, 12)
    base = _layer(model).base_layer(x)
    with pytest.raises(NotImplementedError, match="cannot be merged"):
        model.merge_and_unload()
    with pytest.raises(NotImplementedError, match="cannot be merged"):
        model.merge_adapter()
    plain = model.unload()
    assert isinstance(plain.proj, torch.nn.Linear)
    torch.testing.assert_close(plain(x), base)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("autocast", [True, False])
def test_half_precision_base_models(dtype, autocast):
    torch.manual_seed(8)
    base = tiny_llama(dtype=dtype)
    model = get_peft_model(base, MokaConfig(r=4, target_modules=TARGETS, init_weights=False,
                                            modalities=["text", "visual"]),
                           autocast_adapter_dtype=autocast)
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert layer.moka_A["default"].dtype == (torch.float32 if autocast else dtype)
    embeds = base.get_input_embeddings()(torch.randint(3, 64, (2, 10)))
    ids, question = sample_ids()
    set_modality_ids(model, torch.where(ids == A, V, ids), question)
    out = model(inputs_embeds=embeds, attention_mask=(ids != P).long()).logits
    assert out.dtype == dtype and torch.isfinite(out[ids != P]).all()
