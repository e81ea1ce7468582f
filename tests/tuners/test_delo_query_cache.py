"""DeLo's query cache (mllm.tuners.delo.query_cache): the frozen query pass's features are reused
per sample in training, with the same training results as without the cache; a changed input or
backbone misses; inputs made by trainable parameters (stage 2's projectors) keep the cache off."""

from __future__ import annotations

import logging

import torch
from torch import nn

import mllm  # noqa: F401
from mllm.continual import CmmlBatch, DeloClassifier, train_task
from mllm.modality import Modality
from mllm.modality_context import set_modality_ids
from mllm.tuners.delo import IMAGE_MISSING, TEXT_MISSING, DeloConfig
from tests.tuners.delo_helpers import delo_vilt, vilt_inputs


class ForwardCounter:
    """Counts the backbone's forwards: two per step with a query pass, one on a cache hit."""

    def __init__(self, module: nn.Module):
        self.calls = 0
        module.register_forward_pre_hook(self._count)

    def _count(self, *_):
        self.calls += 1


def _batches(n: int = 3) -> list[CmmlBatch]:
    out = []
    for k in range(n):
        inputs = vilt_inputs(batch=4, text_len=8, seed=10 + k, shift=2.0, vocab_width=6)
        labels = inputs["input_ids"][:, 0] % 2
        out.append(CmmlBatch(inputs, labels, torch.tensor([0, TEXT_MISSING, IMAGE_MISSING, 0])))
    return out


def _classifier(query_cache: bool) -> DeloClassifier:
    torch.manual_seed(3)
    return DeloClassifier(delo_vilt(num_tasks=2, init_weights=True, query_cache=query_cache), num_tasks=2,
                          labels_per_task=2)


def test_continual_training_is_the_same_with_the_cache_and_hits_skip_the_query_pass():
    batches, epochs = _batches(3), 3
    runs = {}
    for query_cache in (False, True):
        model = _classifier(query_cache)
        counter = ForwardCounter(model.backbone.get_base_model())
        torch.manual_seed(0)
        losses = train_task(model, 0, batches, epochs=epochs, lr=1e-2)
        runs[query_cache] = (model, losses, counter.calls)
    (plain, plain_losses, plain_calls), (cached, cached_losses, cached_calls) = runs[False], runs[True]

    steps = len(batches) * epochs
    assert plain_calls == 2 * steps                          # the query pass on every step
    assert cached_calls == steps + len(batches)              # ... only in the first epoch with the cache
    cache = cached.tuner.query_cache
    assert (cache.hits, cache.misses, len(cache.entries)) == ((epochs - 1) * len(batches), len(batches), 12)
    assert plain.tuner.query_cache.hits == plain.tuner.query_cache.misses == 0

    torch.testing.assert_close(torch.tensor(cached_losses), torch.tensor(plain_losses), rtol=1e-5, atol=1e-6)
    plain_state, cached_state = plain.state_dict(), cached.state_dict()
    trained = [n for n, p in plain.named_parameters() if p.requires_grad]
    assert trained and any(not torch.equal(plain_state[n], _classifier(False).state_dict()[n]) for n in trained)
    for name in plain_state:                                 # weights and the Task-Key Memory alike
        torch.testing.assert_close(cached_state[name], plain_state[name], rtol=1e-5, atol=1e-6, msg=name)


def _pooled_after_step(model, inputs: dict) -> torch.Tensor:
    model.train()
    model(**inputs)
    return model.base_model.state.routes[0].pooled


def test_a_changed_input_or_backbone_misses_and_gives_the_fresh_features():
    model, fresh = delo_vilt(), delo_vilt(query_cache=False)
    cache = model.base_model.query_cache
    inputs = vilt_inputs()
    _pooled_after_step(model, inputs)
    _pooled_after_step(model, inputs)
    assert (cache.hits, cache.misses) == (1, 1)

    changed = {**inputs, "pixel_values": inputs["pixel_values"].clone()}
    changed["pixel_values"][2, 0, 0, 0] += 1e-3              # one value of one sample's image
    got = _pooled_after_step(model, changed)
    assert (cache.hits, cache.misses) == (1, 2)
    torch.testing.assert_close(got, _pooled_after_step(fresh, changed), rtol=0, atol=0)

    for backbone in (model, fresh):                          # the frozen backbone changes in place
        with torch.no_grad():
            backbone.get_base_model().encoder.layer[0].output.dense.weight.mul_(1.5)
    got = _pooled_after_step(model, inputs)
    assert (cache.hits, cache.misses) == (1, 3)
    torch.testing.assert_close(got, _pooled_after_step(fresh, inputs), rtol=0, atol=0)
    assert len(cache.entries) == 3                           # emptied, then this batch's samples
    _pooled_after_step(model, inputs)
    assert cache.hits == 2


def _delo_llama(**config):
    from peft import get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64))
    return get_peft_model(llama, DeloConfig(r=2, num_experts=4, num_tasks=2, init_weights=False,
                                            task_type="CAUSAL_LM", **config)).train()


def test_a_sample_padded_to_another_length_hits():
    model = _delo_llama()
    cache = model.base_model.query_cache
    ids = torch.randint(1, 50, (2, 8))
    short = torch.tensor([[1] * 5 + [0] * 3, [1] * 8])
    model(input_ids=ids, attention_mask=short)
    pooled = model.base_model.state.routes[0].pooled
    longer = torch.cat([ids, torch.zeros(2, 4, dtype=torch.long)], 1)
    model(input_ids=longer, attention_mask=torch.cat([short, torch.zeros(2, 4, dtype=torch.long)], 1))
    assert (cache.hits, cache.misses) == (1, 1)
    torch.testing.assert_close(model.base_model.state.routes[0].pooled, pooled, rtol=0, atol=0)
    model(input_ids=ids.flip(0), attention_mask=short.flip(0))           # the same samples in another order
    assert cache.hits == 2
    other = ids.clone()
    other[0, 6] = 7                                          # a real token of sample 0 (not padding) changed
    model(input_ids=other, attention_mask=torch.ones_like(other))
    assert cache.misses == 2


def test_inputs_made_by_trainable_parameters_keep_the_cache_off(caplog):
    model = _delo_llama()
    cache = model.base_model.query_cache
    projector = nn.Linear(16, 16)                             # stands for stage 2's trainable projectors
    ids = torch.full((2, 6), int(Modality.TEXT))
    ids[:, :3] = int(Modality.VISUAL)
    set_modality_ids(model, ids)
    features = torch.randn(2, 6, 16)
    with caplog.at_level(logging.INFO, logger="mllm.tuners.delo.query_cache"):
        for _ in range(2):
            model(inputs_embeds=projector(features))
    assert (cache.hits, cache.misses, len(cache.entries)) == (0, 0, 0)
    assert "inputs depend on trainable parameters" in caplog.text
    assert caplog.text.count("DeLo query cache not used") == 1     # logged once

    # Frozen projectors: cached. A leaf that only requires grad (what reentrant gradient
    # checkpointing marks on the embeddings) is no trainable parameter.
    projector.requires_grad_(False)
    for _ in range(2):
        model(inputs_embeds=projector(features).requires_grad_())
    assert (cache.hits, cache.misses) == (1, 1)


def test_reentrant_gradient_checkpointing_on_a_cache_hit_gives_the_same_gradients():
    """Reentrant checkpointing recomputes each layer in its own backward, so every layer builds its
    own graph to the query maps (``TaskRoute``); on a hit the routes are built the same way."""
    grads = {}
    for query_cache in (False, True):
        model = _delo_llama(query_cache=query_cache)
        base = model.get_base_model()
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
        base.enable_input_require_grads()                    # as MultimodalLM does
        ids = torch.randint(1, 50, (2, 6))
        for _ in range(2):                                   # the second step is a hit when cached
            model.zero_grad()
            out = model(input_ids=ids, labels=ids)
            (out.loss + model.base_model.alignment_loss()).backward()
        assert model.base_model.query_cache.hits == (1 if query_cache else 0)
        grads[query_cache] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert grads[False].keys() == grads[True].keys()
    assert any(".router_" in n for n in grads[False]) and any(".proj_" in n for n in grads[False])
    for name in grads[False]:
        torch.testing.assert_close(grads[True][name], grads[False][name], rtol=1e-5, atol=1e-7, msg=name)


def test_a_trainable_backbone_parameter_or_dropout_keeps_the_cache_off():
    model = _delo_llama()
    model.get_base_model().lm_head.weight.requires_grad_(True)
    model(input_ids=torch.randint(1, 50, (2, 6)))
    assert model.base_model.query_cache.misses == 0
    model = _delo_llama()
    model.get_base_model().config.attention_dropout = 0.1
    model(input_ids=torch.randint(1, 50, (2, 6)))
    assert model.base_model.query_cache.misses == 0
    assert _delo_llama(query_cache=True).base_model.peft_config["default"].query_cache


# -- MLLM stage 2 ------------------------------------------------------------------------------------------

from tests.train.test_stages import assert_same_trained_weights, stage1_dir  # noqa: E402,F401  (module fixture)
from tests.tuners.test_delo_stage2 import _task_config, task_data  # noqa: E402,F401  (module fixture)


def _run_task(tiny_assets, demo_data, out, train, query_cache: bool = True, **kwargs):
    from mllm.train.stages import run_instruct

    cfg = _task_config(tiny_assets, demo_data, out, train, **kwargs)
    cfg.tuner.options["query_cache"] = query_cache
    return run_instruct(cfg)


def _losses(output_dir) -> list[float]:
    import json

    history = json.load(open(output_dir / "trainer_state.json"))["log_history"]
    return [entry["loss"] for entry in history if "loss" in entry]


def test_stage2_first_task_trains_projectors_so_the_cache_stays_off_and_a_later_task_trains_the_same_cached(
        tiny_assets, demo_data, stage1_dir, task_data, tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="mllm.tuners.delo.query_cache"):
        task0 = _run_task(tiny_assets, demo_data, tmp_path / "task0", task_data[0], stage1=stage1_dir,
                          max_steps=2, per_device_train_batch_size=2)
    cache = task0.llm.base_model.query_cache
    assert (cache.hits, cache.misses, len(cache.entries)) == (0, 0, 0)
    assert "inputs depend on trainable parameters" in caplog.text

    # Task 1: projectors frozen (continued run), two epochs in the same batch order.
    task1 = dict(task=1, continue_from=str(tmp_path / "task0"), max_steps=-1, num_train_epochs=2,
                 per_device_train_batch_size=4)
    plain = _run_task(tiny_assets, demo_data, tmp_path / "plain", task_data[1], query_cache=False, **task1)
    assert (plain.llm.base_model.query_cache.hits, plain.llm.base_model.query_cache.misses) == (0, 0)
    cached = _run_task(tiny_assets, demo_data, tmp_path / "cached", task_data[1], **task1)
    cache = cached.llm.base_model.query_cache
    assert cache.hits > 0 and cache.hits == cache.misses                  # epoch 2 hits every batch of epoch 1
    torch.testing.assert_close(torch.tensor(_losses(tmp_path / "cached")), torch.tensor(_losses(tmp_path / "plain")),
                               rtol=1e-5, atol=1e-6)
    assert_same_trained_weights(cached, plain)
    state, plain_state = cached.state_dict(), plain.state_dict()
    memory = [key for key in plain_state if ".delo_query." in key and key.endswith((".keys", ".counts"))]
    assert memory
    for key in memory:                                                    # the Task-Key Memory too
        torch.testing.assert_close(state[key], plain_state[key], rtol=1e-5, atol=1e-6, msg=key)


def test_a_full_cache_keeps_what_it_holds_and_training_is_unchanged(caplog):
    """query_cache_max_mib caps the entries: the first samples stay cached (their batches hit), the
    rest run the query pass, and training gives the same results as with no cache."""
    batches, epochs = _batches(3), 3
    entry_bytes = 2 * 16 * 4 + 2                   # pooled (2, 16) float32 + present (2,) bool: the tiny ViLT
    torch.manual_seed(3)
    model = DeloClassifier(delo_vilt(num_tasks=2, init_weights=True, query_cache_max_mib=5.5 * entry_bytes / 2 ** 20),
                           num_tasks=2, labels_per_task=2)
    cache = model.tuner.query_cache
    torch.manual_seed(0)
    with caplog.at_level(logging.INFO, logger="mllm.tuners.delo.query_cache"):
        losses = train_task(model, 0, batches, epochs=epochs, lr=1e-2)
    assert len(cache.entries) == 5 and cache.bytes == 5 * entry_bytes     # 4 of the first batch, 1 of the second
    assert (cache.hits, cache.misses) == (epochs - 1, 2 * epochs + 1)     # only the first batch hits, from epoch 2
    assert sum("query cache full" in r.message for r in caplog.records) == 1

    plain = _classifier(False)
    torch.manual_seed(0)
    plain_losses = train_task(plain, 0, batches, epochs=epochs, lr=1e-2)
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(plain_losses), rtol=1e-5, atol=1e-6)
