"""MokA as a peft method: registration, save/load (also in a fresh process), several named
adapters, disable/delete, push_to_hub (mocked Hub), and peft's generic invariants."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import textwrap
import warnings
from types import SimpleNamespace
from unittest import mock

import pytest
import torch
from peft import PeftModel, get_peft_model
from peft.utils.peft_types import PeftType

import mllm  # noqa: F401
from mllm.model import set_modality_ids
from mllm.tuners.moka import MokaConfig
from mllm.tuners.registration import register_peft_methods
from tests.tuners.moka_helpers import P, T, V, sample_ids, tiny_llama

TARGETS = ["q_proj", "v_proj", "down_proj"]


def _model(seed=0, **kw):
    torch.manual_seed(seed)
    config = MokaConfig(**{"r": 4, "target_modules": TARGETS, "init_weights": False,
                           "modalities": ["text", "visual", "audio"], **kw})
    return get_peft_model(tiny_llama(seed), config)


def _inputs(model):
    ids, question = sample_ids()
    embeds = model.get_base_model().get_input_embeddings()(torch.randint(3, 64, ids.shape))
    return ids, question, {"inputs_embeds": embeds, "attention_mask": (ids != P).long()}


def _logits(model, ids, question, kwargs):
    set_modality_ids(model, ids, question)
    with torch.no_grad():
        return model(**kwargs).logits


def test_registration_is_idempotent_and_a_real_peft_type():
    register_peft_methods()
    register_peft_methods()
    assert PeftType("MOKA") is PeftType.MOKA and PeftType.MOKA.value == "MOKA"
    assert MokaConfig().peft_type == PeftType.MOKA
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING

    assert PEFT_TYPE_TO_CONFIG_MAPPING[PeftType.MOKA] is MokaConfig
    assert PEFT_TYPE_TO_PREFIX_MAPPING[PeftType.MOKA] == "moka_"


def test_default_targets_per_model_family():
    model = get_peft_model(tiny_llama(), MokaConfig(r=2))
    adapted = {n.split(".")[-1] for n, m in model.named_modules() if hasattr(m, "moka_A")}
    assert adapted == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def test_save_pretrained_and_reload_without_missing_keys(tmp_path):
    model = _model(cross_attention="projected")
    ids, question, kwargs = _inputs(model)
    expected = _logits(model, ids, question, kwargs)
    model.save_pretrained(tmp_path)
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(os.listdir(tmp_path))
    assert "library_name: peft" in (tmp_path / "README.md").read_text()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = PeftModel.from_pretrained(tiny_llama(0), tmp_path)
    assert not [w for w in caught if "missing adapter keys" in str(w.message)]
    assert isinstance(loaded.peft_config["default"], MokaConfig)
    assert loaded.peft_config["default"].cross_attention == "projected"
    torch.testing.assert_close(_logits(loaded, ids, question, kwargs), expected)
    saved = {k: v for k, v in model.state_dict().items() if "moka_" in k}
    reloaded = loaded.state_dict()
    assert all(torch.equal(v, reloaded[k]) for k, v in saved.items())


FRESH = """
import sys, torch
import mllm
from peft import PeftModel
from mllm.model import set_modality_ids
from tests.tuners.moka_helpers import tiny_llama
saved = torch.load(sys.argv[2])
model = PeftModel.from_pretrained(tiny_llama(0), sys.argv[1])
set_modality_ids(model, saved["ids"], saved["question"])
with torch.no_grad():
    logits = model(**saved["kwargs"]).logits
torch.testing.assert_close(logits, saved["logits"])
print("OK")
"""


def test_save_reload_in_a_fresh_process_gives_identical_logits(tmp_path):
    model = _model()
    ids, question, kwargs = _inputs(model)
    expected = _logits(model, ids, question, kwargs)
    model.save_pretrained(tmp_path / "adapter")
    torch.save({"ids": ids, "question": question, "kwargs": kwargs, "logits": expected}, tmp_path / "io.pt")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    done = subprocess.run([sys.executable, "-c", FRESH, str(tmp_path / "adapter"), str(tmp_path / "io.pt")],
                          capture_output=True, text=True, cwd=root, env={**os.environ, "HF_HUB_OFFLINE": "1"},
                          timeout=300)
    assert done.returncode == 0 and "OK" in done.stdout, done.stderr[-3000:]


def test_several_named_adapters_disable_and_delete():
    model = _model()
    ids, question, kwargs = _inputs(model)
    first = _logits(model, ids, question, kwargs)
    torch.manual_seed(9)
    model.add_adapter("other", MokaConfig(r=2, target_modules=TARGETS, init_weights=False,
                                          modalities=["text", "visual", "audio"], variant="unimodal_lora"))
    assert torch.equal(_logits(model, ids, question, kwargs), first)  # "default" still active
    model.set_adapter("other")
    second = _logits(model, ids, question, kwargs)
    assert not torch.allclose(first, second)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".other" in n for n in trainable)
    with model.disable_adapter():
        base = _logits(model, ids, question, kwargs)
    torch.testing.assert_close(base, _logits(tiny_llama(0), ids, question, kwargs))
    model.set_adapter("default")
    model.delete_adapter("other")
    assert not any(".other" in n for n, _ in model.named_parameters())
    torch.testing.assert_close(_logits(model, ids, question, kwargs), first)
    with model.disable_adapter():
        assert torch.equal(_logits(model, ids, question, kwargs), base)
    plain = model.unload()
    torch.testing.assert_close(_logits(plain, ids, question, kwargs), base)


def test_push_to_hub_with_mocked_hub(tmp_path, monkeypatch):
    from huggingface_hub import HfApi, ModelCard
    from huggingface_hub.errors import EntryNotFoundError

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    remote = tmp_path / "remote" / "me" / "moka-tiny"
    remote.mkdir(parents=True)

    def create_commit(self, repo_id, operations, **kwargs):
        for op in operations:
            shutil.copy(op.path_or_fileobj, remote / op.path_in_repo)

    model = _model()
    ids, question, kwargs = _inputs(model)
    expected = _logits(model, ids, question, kwargs)
    with mock.patch.object(HfApi, "create_repo", lambda self, repo_id, **kw: SimpleNamespace(repo_id=repo_id)), \
            mock.patch.object(HfApi, "create_commit", create_commit), \
            mock.patch.object(ModelCard, "load", side_effect=EntryNotFoundError("no card")):
        model.push_to_hub("me/moka-tiny", private=True)
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(os.listdir(remote))
    loaded = PeftModel.from_pretrained(tiny_llama(0), remote)
    torch.testing.assert_close(_logits(loaded, ids, question, kwargs), expected)


def test_only_prefixed_parameters_change_after_sgd_steps():
    model = _model()
    ids, question, kwargs = _inputs(model)
    model.train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    set_modality_ids(model, ids, question)
    for _ in range(2):
        optimizer.zero_grad()
        model(**kwargs).logits.float().pow(2).mean().backward()
        optimizer.step()
    for name, param in model.named_parameters():
        changed = not torch.equal(before[name], param)
        assert changed == ("moka_" in name), name


def test_inject_adapter_in_model_and_torch_pickle(tmp_path):
    from peft import inject_adapter_in_model

    model = inject_adapter_in_model(MokaConfig(r=2, target_modules=TARGETS), tiny_llama())
    assert any(hasattr(m, "moka_A") for m in model.modules())
    peft_model = _model()
    ids, question, kwargs = _inputs(peft_model)
    expected = _logits(peft_model, ids, question, kwargs)
    torch.save(peft_model, tmp_path / "m.pt")
    copy = torch.load(tmp_path / "m.pt", weights_only=False)
    torch.testing.assert_close(_logits(copy, ids, question, kwargs), expected)
