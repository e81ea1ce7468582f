"""MoRA as a peft method: registration, save/load in a fresh process, push_to_hub (mocked Hub),
disable_adapter, several adapters, dtype handling, the TUNER_REGISTRY entry."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import warnings
from types import SimpleNamespace
from unittest import mock

import pytest
import torch
from peft import PeftModel, get_peft_model
from peft.utils.peft_types import PeftType

import mllm  # noqa: F401
from mllm.tuners.mora import MoraConfig, MoraModel
from mllm.tuners.registration import register_peft_method
from tests.tuners.mora_helpers import clip_inputs, clip_outputs, tiny_clip

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _mora(seed=0, **kw):
    torch.manual_seed(seed + 100)
    return get_peft_model(tiny_clip(seed), MoraConfig(**{"dropout": 0.0, "init_weights": False, **kw})).eval()


def test_import_registers_mora_idempotently():
    register_peft_method("mora", MoraConfig, MoraModel)   # again: a no-op
    register_peft_method("mora", MoraConfig, MoraModel)
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING

    assert PeftType("MORA") is PeftType.MORA and MoraConfig().peft_type == PeftType.MORA
    assert PEFT_TYPE_TO_CONFIG_MAPPING[PeftType.MORA] is MoraConfig
    assert PEFT_TYPE_TO_TUNER_MAPPING[PeftType.MORA] is MoraModel
    assert PEFT_TYPE_TO_PREFIX_MAPPING[PeftType.MORA] == "mora_"


def test_tuner_registry_builds_a_mora_config():
    from mllm.config import TunerConfig
    from mllm.tuners import build_peft_config

    config = build_peft_config(TunerConfig(type="mora", r=8, alpha=16, dropout=0.1, target_modules=["k_proj"],
                                           options={"shared_r": 8, "alpha": 0.1, "num_paired_layers": 1}))
    assert isinstance(config, MoraConfig)
    assert (config.r, config.shared_r, config.alpha, config.target_modules) == (8, 8, 0.1, {"k_proj"})


def test_inject_adapter_in_model_is_refused():
    from peft import inject_adapter_in_model

    with pytest.raises(ValueError, match="shared state"):
        inject_adapter_in_model(MoraConfig(), tiny_clip())


FRESH = """
import sys, torch
import mllm
from peft import PeftModel
from tests.tuners.mora_helpers import clip_outputs, tiny_clip
saved = torch.load(sys.argv[2])
model = PeftModel.from_pretrained(tiny_clip(0), sys.argv[1])
torch.testing.assert_close(clip_outputs(model, saved["inputs"]), saved["outputs"])
torch.testing.assert_close(clip_outputs(model.merge_and_unload(), saved["inputs"]), saved["outputs"],
                           atol=1e-5, rtol=1e-5)
print("OK")
"""


def test_save_and_reload_in_a_fresh_process(tmp_path):
    model = _mora()
    inputs = clip_inputs()
    expected = clip_outputs(model, inputs)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.save_pretrained(tmp_path / "adapter")
        PeftModel.from_pretrained(tiny_clip(0), tmp_path / "adapter")
    assert not [w for w in caught if "missing adapter keys" in str(w.message)]
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(os.listdir(tmp_path / "adapter"))
    torch.save({"inputs": inputs, "outputs": expected}, tmp_path / "io.pt")
    done = subprocess.run([sys.executable, "-c", FRESH, str(tmp_path / "adapter"), str(tmp_path / "io.pt")],
                          capture_output=True, text=True, cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"},
                          timeout=300)
    assert done.returncode == 0 and "OK" in done.stdout, done.stderr[-3000:]


def test_push_to_hub_with_mocked_hub(tmp_path, monkeypatch):
    from huggingface_hub import HfApi, ModelCard
    from huggingface_hub.errors import EntryNotFoundError

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    remote = tmp_path / "remote" / "me" / "mora-tiny"
    remote.mkdir(parents=True)
    commits = []

    def create_commit(self, repo_id, operations, **kwargs):
        commits.append((repo_id, kwargs.get("commit_message")))
        for op in operations:   # the upload folder is temporary: copy now
            shutil.copy(op.path_or_fileobj, remote / op.path_in_repo)

    model = _mora()
    inputs = clip_inputs()
    expected = clip_outputs(model, inputs)
    create_repo = mock.Mock(side_effect=lambda repo_id, **kw: SimpleNamespace(repo_id=repo_id))
    with mock.patch.object(HfApi, "create_repo", lambda self, repo_id, **kw: create_repo(repo_id, **kw)), \
            mock.patch.object(HfApi, "create_commit", create_commit), \
            mock.patch.object(ModelCard, "load", side_effect=EntryNotFoundError("no card")):
        model.push_to_hub("me/mora-tiny", private=True, commit_message="MoRA adapter")
    assert create_repo.call_args.kwargs["private"] is True
    assert commits == [("me/mora-tiny", "MoRA adapter")]
    assert {"README.md", "adapter_config.json", "adapter_model.safetensors"} <= set(os.listdir(remote))
    loaded = PeftModel.from_pretrained(tiny_clip(0), remote)
    torch.testing.assert_close(clip_outputs(loaded, inputs), expected)


def test_disable_adapter_gives_the_base_model_and_freezes_nothing_permanently():
    model = _mora()
    inputs = clip_inputs()
    adapted = clip_outputs(model, inputs)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    with model.disable_adapter():
        torch.testing.assert_close(clip_outputs(model, inputs), clip_outputs(tiny_clip(0), inputs))
        assert not any(p.requires_grad for p in model.parameters())
    torch.testing.assert_close(clip_outputs(model, inputs), adapted)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == trainable


def test_only_prefixed_parameters_change_after_sgd_steps():
    model = _mora()
    model.train()
    inputs = clip_inputs()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    weights = torch.randn(2, 24, generator=torch.Generator().manual_seed(3))
    for _ in range(2):
        optimizer.zero_grad()
        out = model(**inputs)
        # (the embeddings are L2-normalised: use a loss that is not constant on the sphere)
        ((out.image_embeds * weights[0]).sum() + (out.text_embeds * weights[1]).sum()).backward()
        optimizer.step()
    for name, param in model.named_parameters():
        assert (not torch.equal(before[name], param)) == ("mora_" in name), name


def test_several_adapters_set_adapter_and_delete():
    model = _mora()
    inputs = clip_inputs()
    first = clip_outputs(model, inputs)
    torch.manual_seed(7)
    model.add_adapter("other", MoraConfig(r=2, shared_r=2, target_modules=["k_proj"], init_weights=False,
                                          num_paired_layers=1, dropout=0.0))
    torch.testing.assert_close(clip_outputs(model, inputs), first)
    model.set_adapter("other")
    assert not torch.allclose(clip_outputs(model, inputs), first)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".other" in n for n in trainable)
    model.set_adapter("default")
    model.delete_adapter("other")
    assert not any(".other" in n for n, _ in model.named_parameters())
    assert "other" not in model.base_model.mora_shared_vision
    torch.testing.assert_close(clip_outputs(model, inputs), first)


@pytest.mark.parametrize("autocast", [True, False])
def test_bfloat16_base_model(autocast):
    torch.manual_seed(100)
    model = get_peft_model(tiny_clip(0, dtype=torch.bfloat16), MoraConfig(init_weights=False, dropout=0.0),
                           autocast_adapter_dtype=autocast)
    expected = torch.float32 if autocast else torch.bfloat16
    shared = list(model.base_model.mora_shared_vision["default"].values())
    assert all(p.dtype == expected for p in shared)
    layer_params = [p for n, p in model.named_parameters() if ".mora_A." in n]
    assert all(p.dtype == expected for p in layer_params)
    inputs = clip_inputs()
    inputs["pixel_values"] = inputs["pixel_values"].bfloat16()
    out = clip_outputs(model, inputs)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    model.merge_adapter()
    assert clip_outputs(model, inputs).dtype == torch.bfloat16
