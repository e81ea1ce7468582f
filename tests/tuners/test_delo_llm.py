"""DeLo inside a decoder LLM, driven by per-token modality ids (DESIGN contract 2)."""

from __future__ import annotations

import torch

import mllm  # noqa: F401
from mllm.modality import Modality
from mllm.modality_context import set_modality_ids
from mllm.tuners import TUNER_REGISTRY, build_peft_config
from mllm.tuners.delo import DeloConfig, DeloModel


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(config).eval()


def test_registry_builds_a_delo_config():
    from mllm.config import TunerConfig

    assert "delo" in TUNER_REGISTRY
    config = build_peft_config(TunerConfig(type="delo", r=2, alpha=4, dropout=0.0,
                                           options={"num_experts": 8, "num_tasks": 3}))
    assert isinstance(config, DeloConfig) and (config.r, config.num_experts, config.num_tasks) == (2, 8, 3)


def test_delo_in_a_causal_lm_routes_per_sample_and_keeps_routing_while_decoding():
    from peft import get_peft_model

    model = get_peft_model(_tiny_llama(), DeloConfig(r=2, num_experts=4, num_tasks=2, init_weights=False,
                                                     task_type="CAUSAL_LM"))
    tuner: DeloModel = model.base_model
    base = _tiny_llama()
    input_ids = torch.randint(1, 50, (2, 6))
    # first three positions stand for image tokens, the rest is text; sample 1's text is missing
    ids = torch.full((2, 6), int(Modality.TEXT))
    ids[:, :3] = int(Modality.VISUAL)
    set_modality_ids(model, ids)
    tuner.set_missing(torch.tensor([0, 1]))
    tuner.force_task(1)
    with torch.no_grad():
        logits = model(input_ids=input_ids).logits
    assert not torch.allclose(logits, base(input_ids=input_ids).logits)
    (route,) = tuner.state.routes
    assert route.task == 1
    torch.testing.assert_close(route.query_text[1], route.query_visual[1])   # guided routing
    prompt_routes = tuner.state.routes
    with torch.no_grad():
        generated = model.generate(input_ids=input_ids, max_new_tokens=3, do_sample=False, use_cache=True)
    assert generated.shape == (2, 9)
    assert tuner.state.routes is not prompt_routes       # the prompt pass re-routed ...
    for new, old in zip(tuner.state.routes, prompt_routes):   # ... to the same queries
        torch.testing.assert_close(new.query_visual, old.query_visual)
        torch.testing.assert_close(new.query_text, old.query_text)
