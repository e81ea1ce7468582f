"""DeLo: decomposed expert update, guided routing, task partitioning, Task-Key Memory, peft
registration and save/load in a fresh process."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

import mllm  # noqa: F401  (registers delo with peft)
from mllm.tuners.delo import COMPLETE, IMAGE_MISSING, TEXT_MISSING, DeloConfig, DeloModel, task_parameter_names
from mllm.tuners.delo.layer import Linear as DeloLinear
from tests.tuners.delo_helpers import delo_vilt, tiny_vilt, vilt_inputs

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_delo_is_a_registered_peft_method():
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
    from peft.utils.peft_types import PeftType

    assert PEFT_TYPE_TO_TUNER_MAPPING[PeftType.DELO] is DeloModel
    assert PEFT_TYPE_TO_CONFIG_MAPPING[PeftType.DELO] is DeloConfig
    assert PeftType.DELO != PeftType.DELORA
    model = delo_vilt()
    adapted = [n for n, m in model.named_modules() if isinstance(m, DeloLinear)]
    assert len(adapted) == 6 and all(n.rsplit(".", 1)[-1] in {"query", "key", "value"} for n in adapted)


def test_identity_at_init():
    model, base, inputs = delo_vilt(init_weights=True), tiny_vilt(), vilt_inputs()
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).last_hidden_state, base(**inputs).last_hidden_state)


def test_selected_factors_give_exactly_the_hand_composed_update():
    model = delo_vilt(num_tasks=2)
    tuner = model.base_model
    layer = model.get_submodule("base_model.model.encoder.layer.1.attention.attention.value")
    seen = {}
    layer.register_forward_hook(lambda mod, args, out: seen.update(x=args[0].detach(), y=out.detach()))
    tuner.force_task(1)
    with torch.no_grad():
        model(**vilt_inputs(batch=3))
    (route,) = tuner.state.routes
    assert route.task == 1 and route.weight.tolist() == [1.0, 1.0, 1.0]
    pools = layer.delo_pools["default"]
    x, y = seen["x"], seen["y"]
    for b in range(x.shape[0]):
        delta_w = torch.zeros(layer.out_features, layer.in_features)
        for modality, query in (("visual", route.query_visual[b]), ("text", route.query_text[b])):
            scores = pools.get("router", modality, 1) @ query
            chosen = scores.argsort(descending=True)[:2]          # r = 2 of E = 4
            for e in chosen.tolist():
                delta_w += torch.outer(pools.get("b", modality, 1)[e], pools.get("a", modality, 1)[e])
        scaling = 2.0 / 2   # alpha / r
        expected = layer.base_layer(x[b]) + scaling * x[b] @ delta_w.T
        torch.testing.assert_close(y[b], expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("code, stand_in", [(TEXT_MISSING, "text"), (IMAGE_MISSING, "visual")])
def test_guided_routing_replaces_the_missing_query(code, stand_in):
    model = delo_vilt()
    tuner = model.base_model
    tuner.force_task(0)
    tuner.set_missing(torch.tensor([COMPLETE, code, COMPLETE]))
    with torch.no_grad():
        model(**vilt_inputs(batch=3))
    (route,) = tuner.state.routes
    q_visual, q_text, complete = tuner.state.align_pairs[0]
    # the available modality's query stands in for the missing one on sample 1 only
    if stand_in == "text":
        torch.testing.assert_close(route.query_text[1], route.query_visual[1])
        torch.testing.assert_close(route.query_visual[1], q_visual[1])
    else:
        torch.testing.assert_close(route.query_visual[1], route.query_text[1])
        torch.testing.assert_close(route.query_text[1], q_text[1])
    for b in (0, 2):
        torch.testing.assert_close(route.query_visual[b], q_visual[b])
        torch.testing.assert_close(route.query_text[b], q_text[b])
        assert not torch.allclose(route.query_visual[b], route.query_text[b])
    assert complete.tolist() == [True, False, True]
    # same routing as if the stand-in query had been the real one: a text-missing sample's text
    # factors are the ones its visual query selects
    layer = model.get_submodule("base_model.model.encoder.layer.0.attention.attention.query")
    other = "visual" if stand_in == "text" else "text"
    missing = "text" if stand_in == "text" else "visual"
    picked_missing, _ = layer.select("default", missing, 0, getattr(route, f"query_{missing}")[1:2])
    picked_by_other, _ = layer.select("default", missing, 0, getattr(route, f"query_{other}")[1:2])
    assert picked_missing.tolist() == picked_by_other.tolist()


def test_alignment_loss_uses_complete_samples_and_trains_the_query_maps():
    model = delo_vilt()
    tuner = model.base_model
    model.train()
    tuner.set_missing(torch.tensor([COMPLETE, TEXT_MISSING, IMAGE_MISSING]))
    model(**vilt_inputs(batch=3))
    loss = tuner.alignment_loss()
    q_visual, q_text, complete = tuner.state.align_pairs[0]
    expected = 1 - torch.nn.functional.cosine_similarity(q_visual[0], q_text[0], dim=0)
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert tuner.delo_query["default"].proj_visual[0].grad.abs().sum() > 0
    assert tuner.delo_query["default"].proj_visual[1].grad is None


def _train_steps(model, task, inputs, steps=3):
    model.base_model.set_task(task)
    model.train()
    # every parameter goes to the optimizer (weight decay included): freezing must come from
    # requires_grad alone
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    for _ in range(steps):
        out = model(**inputs).last_hidden_state
        loss = out.pow(2).mean() + model.base_model.alignment_loss()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def test_training_task_2_leaves_every_task_1_parameter_unchanged():
    model = delo_vilt(num_tasks=3)
    _train_steps(model, 0, vilt_inputs(seed=1))
    names0 = set(task_parameter_names(model, 0))
    assert len(names0) == 2 * 3 * 6 + 2     # 6 layers x (a, b, router) x 2 modalities + 2 query maps
    before = {k: v.detach().clone() for k, v in model.state_dict().items()
              if k in names0 or k.endswith("delo_query.default.keys") or k.endswith("counts")}
    _train_steps(model, 1, vilt_inputs(seed=2))
    after = model.state_dict()
    for name in names0:
        assert torch.equal(before[name], after[name]), name
    keys_before = before["base_model.delo_query.default.keys"]
    torch.testing.assert_close(after["base_model.delo_query.default.keys"][0], keys_before[0], rtol=0, atol=0)
    assert after["base_model.delo_query.default.counts"][1].sum() > 0
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(task_parameter_names(model, 1))
    changed = [n for n in task_parameter_names(model, 1) if not torch.equal(after[n], model.state_dict()[n])]
    assert not changed   # sanity of the state_dict snapshot
    frozen_base = tiny_vilt().state_dict()
    for name, value in frozen_base.items():
        key = f"base_model.model.{name}"
        key = key if key in after else key.replace(".weight", ".base_layer.weight").replace(".bias", ".base_layer.bias")
        assert torch.equal(after[key], value), key


def _separable(task, batch=4, seed=0):
    # task 0: bright images, words from a low id range; task 1: dark images, a disjoint high range
    return vilt_inputs(batch=batch, text_len=8, seed=seed, shift=3.0 if task == 0 else -3.0,
                       token_offset=0 if task == 0 else 56, vocab_width=6)


def test_task_key_memory_picks_the_right_task_per_sample():
    model = delo_vilt(num_tasks=2, init_weights=True)
    tuner = model.base_model
    model.train()
    for task in (0, 1):
        tuner.set_task(task)
        with torch.no_grad():
            for seed in range(2):
                model(**_separable(task, seed=seed))
    model.eval()
    counts = tuner.delo_query["default"].counts
    assert counts.tolist() == [[8.0, 8.0], [8.0, 8.0]]
    first, second = _separable(0, 3, seed=7), _separable(1, 3, seed=8)
    mixed = {k: torch.cat([first[k], second[k]]) for k in first}
    with torch.no_grad():
        model(**mixed)
    assert tuner.state.task_ids.tolist() == [0, 0, 0, 1, 1, 1]
    assert {r.task for r in tuner.state.routes} == {0, 1}
    # still right when one modality is missing
    tuner.set_missing(torch.tensor([TEXT_MISSING, IMAGE_MISSING, COMPLETE] * 2))
    with torch.no_grad():
        model(**mixed)
    assert tuner.state.task_ids.tolist() == [0, 0, 0, 1, 1, 1]


def test_merge_is_refused():
    model = delo_vilt()
    with pytest.raises(NotImplementedError, match="cannot be merged"):
        model.merge_and_unload()


_RELOAD = """
import json, sys, torch
import mllm
from peft import PeftModel
from mllm.continual.vilt_ids import publish_vilt_modality_ids
from tests.tuners.delo_helpers import tiny_vilt, vilt_inputs
model = PeftModel.from_pretrained(tiny_vilt(), sys.argv[1]).eval()
publish_vilt_modality_ids(model)
with torch.no_grad():
    out = model(**vilt_inputs(batch=3, seed=5)).last_hidden_state
print(json.dumps({"out": out.tolist(), "tasks": model.base_model.state.task_ids.tolist()}))
"""


def test_save_and_reload_in_a_fresh_process_gives_identical_outputs(tmp_path):
    model = delo_vilt(num_tasks=2)
    tuner = model.base_model
    model.train()
    for task in (0, 1):   # fill the Task-Key Memory so the reloaded model picks tasks itself
        tuner.set_task(task)
        with torch.no_grad():
            model(**_separable(task))
    model.eval()
    with torch.no_grad():
        expected = model(**vilt_inputs(batch=3, seed=5)).last_hidden_state
    tasks = tuner.state.task_ids.tolist()
    model.save_pretrained(tmp_path)
    from safetensors.torch import load_file

    saved = load_file(tmp_path / "adapter_model.safetensors")
    assert "base_model.delo_query.keys" in saved and not any(".default." in k for k in saved)
    run = subprocess.run([sys.executable, "-c", _RELOAD, str(tmp_path)], cwd=REPO, capture_output=True, text=True,
                         timeout=240)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "missing adapter keys" not in run.stderr
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["tasks"] == tasks
    torch.testing.assert_close(torch.tensor(result["out"]), expected, rtol=0, atol=1e-6)


def test_disable_adapter_gives_the_base_model_and_loading_for_training_keeps_the_partition(tmp_path):
    from peft import PeftModel

    model, base, inputs = delo_vilt(num_tasks=2), tiny_vilt(), vilt_inputs()
    with torch.no_grad(), model.disable_adapter():
        torch.testing.assert_close(model(**inputs).last_hidden_state, base(**inputs).last_hidden_state)
    model.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(tiny_vilt(), tmp_path, is_trainable=True)
    reloaded.base_model.set_task(1)
    assert {n for n, p in reloaded.named_parameters() if p.requires_grad} == set(task_parameter_names(reloaded, 1))
    frozen = PeftModel.from_pretrained(tiny_vilt(), tmp_path)
    assert not any(p.requires_grad for p in frozen.parameters())


def test_gradient_checkpointing_gives_the_same_gradients():
    grads = []
    for checkpointing in (False, True):
        model = delo_vilt(num_tasks=2)
        if checkpointing:
            model.get_base_model().gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        model.base_model.set_missing(torch.tensor([COMPLETE, TEXT_MISSING, IMAGE_MISSING]))
        out = model(**vilt_inputs()).last_hidden_state
        (out.pow(2).mean() + model.base_model.alignment_loss()).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) == 38
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-4, atol=1e-6, msg=name)


def test_disabled_adapter_does_not_touch_the_memory_and_unload_returns_the_base_model():
    model, base, inputs = delo_vilt(), tiny_vilt(), vilt_inputs()
    model.train()
    with model.disable_adapter():
        model(**inputs)
    assert model.base_model.delo_query["default"].counts.sum() == 0
    model(**inputs)
    assert model.base_model.delo_query["default"].counts.sum() > 0
    plain = model.base_model.unload().eval()
    assert not plain._forward_pre_hooks
    with torch.no_grad():
        torch.testing.assert_close(plain(**inputs).last_hidden_state, base(**inputs).last_hidden_state)


def test_bf16_backbone_keeps_fp32_adapter_and_memory():
    from peft import get_peft_model

    from mllm.continual.vilt_ids import publish_vilt_modality_ids

    model = get_peft_model(tiny_vilt().to(torch.bfloat16), DeloConfig(r=2, num_experts=4, num_tasks=2,
                                                                      init_weights=False))
    publish_vilt_modality_ids(model)
    assert {p.dtype for n, p in model.named_parameters() if "delo_" in n} == {torch.float32}
    inputs = vilt_inputs()
    inputs["pixel_values"] = inputs["pixel_values"].bfloat16()
    model.train()
    out = model(**inputs).last_hidden_state
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    (out.float().pow(2).mean() + model.base_model.alignment_loss()).backward()
    assert model.base_model.delo_query["default"].keys.dtype == torch.float32


def test_a_forward_whose_ids_nobody_published_is_refused_not_given_old_ones():
    """ViLT's ids come from the continual code's publisher (mllm.continual.vilt_ids), not from DeLo;
    without it DeLo names what is missing instead of reusing an earlier forward's ids."""
    model = delo_vilt()
    with torch.no_grad():
        model(**vilt_inputs())                       # the helper's publisher gives this forward its ids
    embeddings = next(m for m in model.modules() if type(m).__name__ == "ViltEmbeddings")
    embeddings._forward_hooks.clear()                # no publisher any more
    with pytest.raises(RuntimeError, match="needs per-token modality ids"):
        with torch.no_grad():
            model(**vilt_inputs())
