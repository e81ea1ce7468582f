"""QLoRA: stage 2 over a bitsandbytes 4-bit (NF4) LLM, with LoRA and with MokA, on the CPU.

The tiny LLM here is 64 wide: bitsandbytes quantizes in blocks of 64 and its CPU path needs
every Linear at least that wide.
"""

from __future__ import annotations

import bitsandbytes as bnb
import pytest
import torch

from mllm.config import TunerConfig, config_from_dict
from mllm.modality import Modality
from mllm.model import MultimodalLM
from mllm.train.stages import run_instruct
from tests.conftest import model_section
from tests.test_modality_context import _batch, _expected

LORA = {"type": "lora", "r": 4, "alpha": 8, "dropout": 0.0}
MOKA = {"type": "moka", "r": 2, "alpha": 4, "dropout": 0.0,
        "options": {"modalities": ["text", "visual"], "strengths": {"visual": 0.8}}}
DORA = {**LORA, "type": "dora"}
DELO = {"type": "delo", "r": 2, "alpha": 4, "dropout": 0.0, "options": {"num_experts": 4, "num_tasks": 2}}
# MoRA pairs the CLIP tower's layer with the LLM's last (4-bit) layer.
MORA = {"type": "mora", "r": 4, "dropout": 0.0,
        "options": {"pair_encoder": "visual", "num_paired_layers": 1, "shared_r": 2}}
TUNERS = [LORA, DORA, MOKA, DELO, MORA]
TUNER_IDS = [t["type"] for t in TUNERS]
PARAM_PREFIX = {"lora": "lora_", "dora": "lora_", "moka": "moka_", "delo": "delo_", "mora": "mora_"}


def _is_b(name: str) -> bool:
    """The zero-initialised up-projections: lora_B / moka_B, DeLo's b pools."""
    return "_B" in name or ".b_" in name


@pytest.fixture(scope="module")
def llm64(tiny_assets, tmp_path_factory) -> str:
    from transformers import AutoTokenizer

    from mllm.demo.assets import TinySizes, build_tiny_llama

    path = str(tmp_path_factory.mktemp("llm64"))
    build_tiny_llama(path, AutoTokenizer.from_pretrained(tiny_assets["llm"]), TinySizes(llm_hidden=64, llm_heads=4))
    return path


def _model_section(tiny_assets, llm64, quantization="nf4") -> dict:
    return model_section(tiny_assets, llm=llm64, quantization=quantization)


def _qlora_model(tiny_assets, llm64, tuner: dict) -> MultimodalLM:
    torch.manual_seed(0)
    model = MultimodalLM.from_config(config_from_dict({"model": _model_section(tiny_assets, llm64)}).model)
    model.freeze_llm()
    model.apply_tuner(TunerConfig(**tuner))
    return model


def _linear_types(model) -> set[str]:
    return {type(m).__name__ for m in model.base_llm.modules() if isinstance(m, (torch.nn.Linear, bnb.nn.Linear4bit))}


def test_quantization_field_is_validated():
    from mllm.config import ConfigError

    with pytest.raises(ConfigError, match="quantization"):
        config_from_dict({"model": {"llm": "x", "quantization": "int3"}})


@pytest.mark.parametrize("tuner", TUNERS, ids=TUNER_IDS)
def test_gradients_reach_the_tuner_through_4bit_layers(tiny_assets, llm64, tuner):
    model = _qlora_model(tiny_assets, llm64, tuner).train()
    assert "Linear4bit" in _linear_types(model)
    batch = _batch(model, "right")
    labels = batch["input_ids"].masked_fill(_expected(model, batch) != Modality.TEXT, -100)
    model(**batch, labels=labels).loss.backward()
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    adapter = {n: p for n, p in trainable.items() if n.startswith("llm.")}
    assert adapter and all(PARAM_PREFIX[tuner["type"]] in n for n in adapter)
    # Every A and the B matrices get a gradient (B starts at 0, so A's first gradient is 0 too).
    assert all(p.grad is not None for p in adapter.values())
    assert any(bool(p.grad.abs().sum() > 0) for n, p in adapter.items() if _is_b(n))
    # The 4-bit base weights are frozen (uint8 storage, no gradient).
    assert all(not p.requires_grad for n, p in model.base_llm.named_parameters() if p.dtype == torch.uint8)


@pytest.mark.parametrize("tuner", TUNERS, ids=TUNER_IDS)
def test_stage2_on_a_4bit_llm_saves_and_reloads(tiny_assets, demo_data, llm64, tmp_path, tuner):
    cfg = config_from_dict({
        "model": _model_section(tiny_assets, llm64), "tuner": tuner,
        "data": {"train": demo_data["instruct"], "media_root": demo_data["media_root"]},
        "training": {"output_dir": str(tmp_path), "max_steps": 2, "per_device_train_batch_size": 4,
                     "learning_rate": 1e-2, "use_cpu": True, "disable_tqdm": True, "save_steps": 1000,
                     "report_to": "none"}})
    model = run_instruct(cfg)
    b = [p for n, p in model.llm.named_parameters() if _is_b(n)]
    assert b and any(bool(p.abs().sum() > 0) for p in b)  # trained away from the zero init
    reloaded = MultimodalLM.from_pretrained(str(tmp_path))
    assert reloaded.config.quantization == "nf4" and "Linear4bit" in _linear_types(reloaded)
    batch = _batch(model, "right")
    with torch.no_grad():
        want = model.eval()(**batch).logits
        got = reloaded(**batch).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


NOT_IDENTITY = {"lora": {"init_lora_weights": False}, "dora": {"init_lora_weights": False},
                "mora": {"init_weights": False}}


@pytest.mark.parametrize("tuner", [LORA, DORA, MORA], ids=["lora", "dora", "mora"])
def test_merging_dequantizes_the_llm_and_keeps_its_outputs(tiny_assets, llm64, tuner):
    options = {**tuner.get("options", {}), **NOT_IDENTITY[tuner["type"]]}
    model = _qlora_model(tiny_assets, llm64, {**tuner, "options": options})
    batch = _batch(model, "right")
    # Train mode: bitsandbytes' CPU inference path would compute with bf16 block scales.
    with torch.no_grad():
        before = model.train()(**batch).logits
        model.merge_tuner()
        after = model(**batch).logits
    assert _linear_types(model) == {"Linear"}  # full precision, no adapter layers left
    assert model.config.quantization is None and not hasattr(model.llm, "peft_config")
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)


def test_mora_refuses_to_merge_into_4bit_weights_directly(tiny_assets, llm64):
    """Re-quantizing a merged W' would lose the update: peft's own merge raises and points to
    ``merge_tuner``, which dequantizes first."""
    model = _qlora_model(tiny_assets, llm64, MORA)
    with pytest.raises(NotImplementedError, match="dequantize the base model first"):
        model.llm.merge_and_unload()
    assert "Linear4bit" in _linear_types(model)
    # Refused before anything merged: the (full-precision) CLIP layers are not merged either.
    assert not any(m.merged for m in model.encoders["visual"].modules() if hasattr(m, "merged_adapters"))


@pytest.mark.parametrize("tuner", [MOKA, DELO], ids=["moka", "delo"])
def test_token_routed_tuners_on_a_4bit_llm_do_not_merge(tiny_assets, llm64, tuner):
    model = _qlora_model(tiny_assets, llm64, tuner)
    with pytest.raises(NotImplementedError, match="4-bit"):
        model.merge_tuner()
    assert model.config.quantization == "nf4" and "Linear4bit" in _linear_types(model)  # untouched
