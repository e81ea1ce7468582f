"""MoRA's method: pairing, identity at initialisation, eq 4 recomputed independently, merging,
Gram coupling across branches, shared factors stored once."""

from __future__ import annotations

import json
import re

import pytest
import torch
from peft import PeftModel, get_peft_model
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors.torch import load_file
from transformers import CLIPModel

import mllm  # noqa: F401
from mllm.tuners.mora import MoraConfig, Pairing
from tests.tuners.mora_helpers import clip_inputs, clip_outputs, tiny_clip

ATTN = "self_attn"


def _mora(seed=0, init_weights=False, **kw):
    torch.manual_seed(seed + 100)
    config = MoraConfig(**{"r": 4, "shared_r": 3, "alpha": 0.7, "dropout": 0.0,
                           "init_weights": init_weights, **kw})
    return get_peft_model(tiny_clip(seed), config).eval()


def _adapted(model):
    return sorted(n for n, m in model.named_modules() if isinstance(m, BaseTunerLayer))


def _loss(embeds):
    # CLIP's embeddings are L2-normalised: a weighted sum is not constant on the sphere.
    return (embeds * torch.randn(embeds.shape[-1], generator=torch.Generator().manual_seed(3))).sum()


# -- pairing -------------------------------------------------------------------------------------------
def test_default_pairing_matches_the_last_layers_from_the_end():
    model = _mora(num_paired_layers=2, target_modules=["q_proj", "v_proj"])
    assert model.base_model.pairing(model.peft_config["default"]).pairs == ((1, 0), (2, 1))
    assert _adapted(model) == [f"base_model.model.{tower}_model.encoder.layers.{i}.{ATTN}.{p}"
                               for tower, layers in (("text", (0, 1)), ("vision", (1, 2)))
                               for i in layers for p in ("q_proj", "v_proj")]
    shared = sorted(model.base_model.mora_shared_vision["default"].keys())
    assert shared == ["v1_t0_self_attn_q_proj", "v1_t0_self_attn_v_proj", "v2_t1_self_attn_q_proj",
                      "v2_t1_self_attn_v_proj"]
    # Widths follow each tower: S^v is shared_r x 48, S^t shared_r x 32.
    assert model.base_model.mora_shared_vision["default"]["v1_t0_self_attn_q_proj"].shape == (3, 48)
    assert model.base_model.mora_shared_text["default"]["v1_t0_self_attn_q_proj"].shape == (3, 32)


def test_explicit_pairs_projections_and_sharing_across_projections():
    model = _mora(layer_pairs=[[0, -1]], target_modules=["k_proj", "out_proj"], share_across_projections=True)
    assert model.base_model.pairing(model.peft_config["default"]).pairs == ((0, 1),)
    assert _adapted(model) == [f"base_model.model.text_model.encoder.layers.1.{ATTN}.k_proj",
                               f"base_model.model.text_model.encoder.layers.1.{ATTN}.out_proj",
                               f"base_model.model.vision_model.encoder.layers.0.{ATTN}.k_proj",
                               f"base_model.model.vision_model.encoder.layers.0.{ATTN}.out_proj"]
    assert list(model.base_model.mora_shared_vision["default"].keys()) == ["v0_t1"]


@pytest.mark.parametrize("kw, message", [
    ({"num_paired_layers": 3}, "num_paired_layers=3"),
    ({"layer_pairs": [[0, 5]]}, "out of range"),
    ({"layer_pairs": [[0, 0], [0, 1]]}, "vision layer twice"),
    ({"vision_layers": "nowhere.layers"}, "no layer list"),
])
def test_bad_pairings_are_refused(kw, message):
    with pytest.raises(ValueError, match=message):
        _mora(**kw)


def test_non_square_targets_and_bad_configs_are_refused():
    with pytest.raises(TypeError, match="square"):
        _mora(target_modules=["fc1"])
    with pytest.raises(ValueError, match="r >= shared_r"):
        MoraConfig(r=2, shared_r=4)
    with pytest.raises(ValueError, match="pairing"):
        MoraConfig(layers_to_transform=[1])


def test_pairing_handles_towers_nested_under_a_prefix():
    pairing = Pairing("vision_model.encoder.layers", "text_model.encoder.layers", ((1, 0),), False)
    site = pairing.site("clip.vision_model.encoder.layers.1.self_attn.q_proj")
    assert (site.branch, site.layer, site.inner, site.root) == ("vision", 1, "self_attn.q_proj", "clip.")
    assert pairing.partner_key(site) == "clip.text_model.encoder.layers.0.self_attn.q_proj"
    assert pairing.site("clip.text_projection") is None


# -- initialisation -------------------------------------------------------------------------------------
def test_identity_at_initialisation_and_every_factor_gets_a_gradient():
    inputs = clip_inputs()
    expected = clip_outputs(tiny_clip(0), inputs)
    model = _mora(init_weights=True, target_modules=["q_proj", "k_proj", "v_proj", "out_proj"])
    torch.testing.assert_close(clip_outputs(model, inputs), expected, atol=1e-5, rtol=1e-5)
    # The magnitudes start with a^b + a^s = 1 exactly.
    for module in model.modules():
        if isinstance(module, BaseTunerLayer):
            assert float(module._magnitude("default").detach()) == 1.0
    # ... yet nothing sits at a stationary point: the shared term is not zero, the specific factors
    # cancel it, and every trainable tensor receives a gradient at step 0.
    model.train()
    out = model(**inputs)
    (_loss(out.image_embeds) + _loss(out.text_embeds)).backward()
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert any("mora_shared_vision" in n for n in trainable) and any("mora_shared_magnitude" in n for n in trainable)
    dead = [n for n, p in trainable.items() if p.grad is None or not p.grad.abs().max() > 1e-5]
    assert not dead, dead


def test_merged_weights_at_initialisation_equal_the_base_weights():
    base = tiny_clip(0)
    merged = _mora(init_weights=True).merge_and_unload()
    for (name, w0), (_, w) in zip(base.state_dict().items(), merged.state_dict().items()):
        torch.testing.assert_close(w, w0, atol=1e-6, rtol=0, msg=name)


# -- the equation ---------------------------------------------------------------------------------------
def _eq4_weights(adapter_dir, base):
    """W' = (a^b + a^s) W0 + eta (B A + S^T (S^o S^o^T) S) for each adapted module, recomputed from
    the saved files alone (not through the layer code)."""
    saved = load_file(str(adapter_dir / "adapter_model.safetensors"))
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    eta = config["alpha"]
    weights = {}
    for key in saved:
        if not key.endswith(".mora_A"):
            continue
        module = key.removeprefix("base_model.model.").removesuffix(".mora_A")
        tower, layer = module.split(".")[0], int(module.split(".")[3])
        inner = "_".join(module.split(".")[4:])
        pairs = {tuple(map(int, re.match(r"v(\d+)_t(\d+)_", k.split(".")[-1]).groups()))
                 for k in saved if k.startswith("base_model.mora_shared_vision.")}
        v, t = next((v, t) for v, t in pairs if (v if tower == "vision_model" else t) == layer)
        pair = f"v{v}_t{t}_{inner}"
        s_v, s_t = saved[f"base_model.mora_shared_vision.{pair}"], saved[f"base_model.mora_shared_text.{pair}"]
        s_own, s_other = (s_v, s_t) if tower == "vision_model" else (s_t, s_v)
        a_s = saved[f"base_model.mora_shared_magnitude.{pair}"]
        a_b = saved[f"base_model.model.{module}.mora_magnitude"]
        A, B = saved[key], saved[f"base_model.model.{module}.mora_B"]
        w0 = base.get_submodule(module).weight.detach()
        gram = s_other @ s_other.T
        weights[module] = (a_b + a_s) * w0 + eta * (B @ A + s_own.T @ gram @ s_own)
    return weights


def test_merged_weight_equals_eq4_recomputed_from_the_saved_factors(tmp_path):
    model = _mora(target_modules=["q_proj", "v_proj"])
    model.save_pretrained(tmp_path)
    expected = _eq4_weights(tmp_path, tiny_clip(0))
    assert len(expected) == 8
    merged = model.merge_and_unload()
    for module, weight in expected.items():
        torch.testing.assert_close(merged.get_submodule(module).weight, weight, atol=1e-5, rtol=1e-5)
    # Everything else is untouched.
    base = tiny_clip(0).state_dict()
    for name, value in merged.state_dict().items():
        if name.removesuffix(".weight") not in expected:
            assert torch.equal(value, base[name]), name


def test_merge_and_unload_gives_a_plain_model_equal_to_the_unmerged_one():
    inputs = clip_inputs()
    model = _mora(target_modules=["q_proj", "k_proj", "v_proj", "out_proj"])
    unmerged = clip_outputs(model, inputs)
    assert not torch.allclose(unmerged, clip_outputs(tiny_clip(0), inputs), atol=1e-3)
    model.merge_adapter()
    torch.testing.assert_close(clip_outputs(model, inputs), unmerged, atol=1e-5, rtol=1e-5)
    model.unmerge_adapter()
    torch.testing.assert_close(clip_outputs(model, inputs), unmerged, atol=1e-5, rtol=1e-5)
    plain = model.merge_and_unload(safe_merge=True)
    assert type(plain) is CLIPModel and not hasattr(plain, "peft_config")
    assert not any(isinstance(m, BaseTunerLayer) for m in plain.modules())
    torch.testing.assert_close(clip_outputs(plain, inputs), unmerged, atol=1e-5, rtol=1e-5)


def test_unmerge_restores_the_base_weights():
    model = _mora()
    before = {k: v.clone() for k, v in model.get_base_model().state_dict().items() if "base_layer" in k}
    model.merge_adapter()
    model.unmerge_adapter()
    after = model.get_base_model().state_dict()
    for key, value in before.items():
        torch.testing.assert_close(after[key], value, atol=1e-6, rtol=1e-6)


def test_broken_adapter_is_caught_by_safe_merge():
    model = _mora()
    with torch.no_grad():
        next(iter(model.base_model.mora_shared_vision["default"].values())).fill_(float("nan"))
    with pytest.raises(ValueError, match="NaNs detected in the merged weights. The adapter default seems to be broken"):
        model.merge_adapter(safe_merge=True)


def test_gram_matrices_couple_the_branches():
    # A loss on the image embeddings alone reaches S^t (through G^t in the vision update) and a
    # loss on the text embeddings alone reaches S^v: the bidirectional transfer of eq 4.
    inputs = clip_inputs()
    for side, other in (("image_embeds", "mora_shared_text"), ("text_embeds", "mora_shared_vision")):
        model = _mora()
        model.train()
        _loss(getattr(model(**inputs), side)).backward()
        grads = [p.grad for p in getattr(model.base_model, other)["default"].values()]
        assert all(g is not None and g.abs().max() > 1e-5 for g in grads), side


# -- checkpoints --------------------------------------------------------------------------------------------
def test_shared_factors_are_stored_once_and_survive_save_and_reload(tmp_path):
    inputs = clip_inputs()
    model = _mora()
    expected = clip_outputs(model, inputs)
    model.save_pretrained(tmp_path)
    saved = load_file(str(tmp_path / "adapter_model.safetensors"))
    shared = sorted(k for k in saved if "mora_shared" in k)
    assert len(shared) == 3 * 4      # S^v, S^t, a^s for 2 pairs x 2 projections, nothing per layer
    assert all(k.startswith("base_model.mora_shared_") for k in shared)
    assert len([k for k in saved if k.endswith(".mora_A")]) == 8
    loaded = PeftModel.from_pretrained(tiny_clip(0), tmp_path)
    for name in ("mora_shared_vision", "mora_shared_text", "mora_shared_magnitude"):
        for pair, param in getattr(model.base_model, name)["default"].items():
            assert torch.equal(getattr(loaded.base_model, name)["default"][pair], param)
    torch.testing.assert_close(clip_outputs(loaded, inputs), expected)
