"""MokA's layer math and routing against peft LoRA and against a per-token oracle (eqs 4-13)."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model

import mllm  # noqa: F401  (registers moka with peft)
from mllm.modality_context import set_modality_ids
from mllm.tuners.moka import MokaConfig
from tests.tuners.moka_helpers import A, OneLinear, P, T, V, moka_oracle, sample_ids, tiny_llama

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


@pytest.mark.parametrize("equal_key_counts", [False, True])
@pytest.mark.parametrize("ranks", [None, {"visual": 2, "audio": 3}])
def test_cross_attention_matches_per_token_oracle(ranks, equal_key_counts):
    torch.manual_seed(2)
    strengths = {"visual": 0.7, "audio": 1.3}
    model = _moka(OneLinear(), r=4, alpha=8, modalities=["text", "visual", "audio"], modality_ranks=ranks,
                  strengths=strengths)
    layer = _layer(model)
    ids, question = sample_ids()
    if equal_key_counts:  # no padding slot in the compact key set (no mask)
        question[0, 8] = False
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
    expected = torch.autograd.grad((moka_oracle(x, ids, question, blocks, weight_B, 2.0, strengths, r=4)
                                    * target).sum(),
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
    for bad in (7, -5):  # not a modality id at all
        set_modality_ids(model, torch.tensor([[T, bad]]))
        with pytest.raises(ValueError, match=str(bad)):
            model(torch.randn(1, 2, 12))
    set_modality_ids(model, torch.tensor([[T, T, T]]))
    with pytest.raises(RuntimeError, match="do not match"):
        model(torch.randn(1, 2, 12))


@pytest.mark.parametrize("variant,ranks", [("moka", {"text": 2}), ("unimodal_lora", None)])
def test_all_text_tokens_take_the_text_A_and_its_B_columns(variant, ranks):
    """The all-text path (decode steps): moka with a text rank below r uses the first columns of
    the shared B; unimodal_lora uses text's own B block."""
    torch.manual_seed(12)
    model = _moka(OneLinear(), r=4, alpha=8, modalities=["text", "visual", "audio"], modality_ranks=ranks,
                  variant=variant)
    layer = _layer(model)
    layout = layer.moka_layout["default"]
    block = layout.block(layout.text_slot)
    A_text, B = layer.moka_A["default"].detach()[block], layer.moka_B["default"].detach()
    B_text = B[:, : block.stop - block.start] if variant == "moka" else B[:, block]
    x = torch.randn(2, 3, 12)
    set_modality_ids(model, torch.full((2, 3), T), decode_step=True)
    torch.testing.assert_close(model(x), layer.base_layer(x) + 2.0 * (x @ A_text.T) @ B_text.T, rtol=1e-5, atol=1e-5)


def test_routing_is_computed_once_per_forward_and_shared_by_all_layers(monkeypatch):
    from mllm.tuners.moka import routing

    calls = []
    compute = routing._compute_routes
    monkeypatch.setattr(routing, "_compute_routes", lambda *a: calls.append(a) or compute(*a))
    model = get_peft_model(tiny_llama(), MokaConfig(r=4, target_modules=TARGETS, init_weights=False,
                                                    modalities=["text", "visual", "audio"]))
    layers = [m for m in model.modules() if hasattr(m, "moka_A")]
    assert len(layers) == 6
    ids, question = sample_ids()
    input_ids = torch.randint(3, 64, (2, 10))
    set_modality_ids(model, ids, question)
    with torch.no_grad():
        first = model(input_ids=input_ids, attention_mask=(ids != P).long()).logits
        assert len(calls) == 1
        model(input_ids=input_ids, attention_mask=(ids != P).long())      # the same published tensors
        assert len(calls) == 1
        set_modality_ids(model, ids.clone(), question.clone())            # new tensors, same values
        again = model(input_ids=input_ids, attention_mask=(ids != P).long()).logits
    assert len(calls) == 2
    torch.testing.assert_close(again, first, rtol=0, atol=0)


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


@pytest.mark.parametrize("ranks", [None, {"visual": 2, "audio": 3}])
def test_projected_cross_attention_matches_the_oracle_with_non_identity_projections(ranks):
    """Appendix B (eqs 16-17): W_q per query modality, W_k and W_v shared over the text keys,
    all random (not the identity they start at), against a per-token hand computation; and the
    projections receive the gradients of that computation."""
    torch.manual_seed(11)
    strengths = {"visual": 0.7, "audio": 1.3}
    model = _moka(OneLinear(), r=4, alpha=8, modalities=["text", "visual", "audio"], modality_ranks=ranks,
                  strengths=strengths, cross_attention="projected")
    layer = _layer(model)
    W_q, W_k, W_v = (getattr(layer, n)["default"] for n in ("moka_query", "moka_key", "moka_value"))
    with torch.no_grad():
        for param in (W_q, W_k, W_v):
            param.copy_(torch.randn_like(param))
    layout = layer.moka_layout["default"]
    assert [layout.modalities[i] for i in layout.nontext_slots] == ["visual", "audio"]
    ids, question = sample_ids()
    x = torch.randn(2, 10, 12)
    target = torch.randn(2, 10, 10)
    set_modality_ids(model, ids, question)
    out = model(x)
    (out * target).sum().backward()

    def oracle(W_q, W_k, W_v):
        projections = {"query": {"visual": W_q[0], "audio": W_q[1]}, "key": W_k, "value": W_v}
        return moka_oracle(x, ids, question, _blocks(layer), layer.moka_B["default"].detach(), 2.0, strengths,
                           r=4, projections=projections)

    expected = layer.base_layer(x) + oracle(W_q.detach(), W_k.detach(), W_v.detach())
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    # The projections matter: with identity projections the output is plain MokA's, and differs.
    eye = torch.eye(4)
    plain = layer.base_layer(x) + oracle(torch.stack([eye, eye]), eye, eye)
    assert not torch.allclose(out, plain, atol=1e-3)
    params = [p.detach().clone().requires_grad_(True) for p in (W_q, W_k, W_v)]
    grads = torch.autograd.grad((oracle(*params) * target).sum(), params)
    for param, grad in zip((W_q, W_k, W_v), grads):
        torch.testing.assert_close(param.grad, grad, rtol=1e-5, atol=1e-5)


#: Half precision against fp32 on the tiny LLaMA (logits of size ~0.4): the largest logit error,
#: a few units in the last place of the dtype (bf16 keeps 8 significant bits, fp16 11; about 4x
#: the observed 0.0025 and 0.0004), and the relative error (2-norm) of each adapter gradient
#: (observed below 0.021 and 0.0025).
HALF_TOLERANCE = {torch.bfloat16: 0.01, torch.float16: 0.002}
HALF_GRAD_TOLERANCE = {torch.bfloat16: 0.06, torch.float16: 0.01}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("autocast", [True, False])
def test_half_precision_base_models(dtype, autocast):
    """A bf16 / fp16 base model (adapters in fp32 with peft's autocast, else in the base dtype)
    gives the fp32 model's logits and adapter gradients within the dtype's precision."""
    torch.manual_seed(8)
    config = MokaConfig(r=4, target_modules=TARGETS, init_weights=False, modalities=["text", "visual"],
                        strengths={"visual": 1.0})
    reference = get_peft_model(tiny_llama(), config)
    model = get_peft_model(tiny_llama(dtype=dtype), config, autocast_adapter_dtype=autocast)
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert layer.moka_A["default"].dtype == (torch.float32 if autocast else dtype)
    adapter = {k: v for k, v in reference.state_dict().items() if "moka_" in k}
    assert adapter
    loaded = model.load_state_dict(adapter, strict=False)   # same weights, cast to the model's dtypes
    assert not loaded.unexpected_keys and not [k for k in loaded.missing_keys if "moka_" in k]
    input_ids = torch.randint(3, 64, (2, 10))
    ids, question = sample_ids()
    ids = torch.where(ids == A, V, ids)
    mask = (ids != P).long()
    real = ids != P
    logits, grads = {}, {}
    for name, peft_model in (("fp32", reference), ("half", model)):
        set_modality_ids(peft_model, ids, question)
        out = peft_model(input_ids=input_ids, attention_mask=mask).logits
        logits[name] = out.float()
        (out.float()[real] * torch.linspace(-1, 1, out.shape[-1])).sum().backward()
        grads[name] = {n: p.grad.float() for n, p in peft_model.named_parameters() if p.grad is not None}
    assert model(input_ids=input_ids, attention_mask=mask).logits.dtype == dtype
    tolerance = HALF_TOLERANCE[dtype]
    error = (logits["half"][real] - logits["fp32"][real]).abs().max()
    assert error < tolerance, f"{dtype}: max logit error {error:.4f}"
    # The adapter's contribution is resolved at that precision: it moves the logits far more.
    with reference.disable_adapter(), torch.no_grad():
        base = reference(input_ids=input_ids, attention_mask=mask).logits
    assert (base[real] - logits["fp32"][real]).abs().max() > 10 * tolerance
    assert grads["half"].keys() == grads["fp32"].keys() and any("moka_A" in n for n in grads["fp32"])
    for name, expected in grads["fp32"].items():
        got = grads["half"][name]
        relative = (got - expected).norm() / expected.norm()
        assert torch.isfinite(got).all() and relative < HALF_GRAD_TOLERANCE[dtype], f"{name}: {relative:.4f}"
