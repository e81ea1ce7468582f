"""MokA as a peft method: registration, save/load (also in a fresh process), several named
adapters, disable/delete, push_to_hub (mocked Hub), and peft's generic invariants."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import warnings
from types import SimpleNamespace
from unittest import mock

import pytest
import torch
from huggingface_hub import ModelCard
from peft import PeftModel, get_peft_model
from peft.utils import get_peft_model_state_dict
from peft.utils.peft_types import PeftType
from safetensors.torch import load_file

import mllm  # noqa: F401
from mllm.modality_context import set_modality_ids
from mllm.tuners.moka import MokaConfig, MokaLayer, MokaModel
from mllm.tuners.registration import register_peft_method
from tests.tuners.moka_helpers import OneLinear, P, sample_ids, tiny_llama

TARGETS = ["q_proj", "v_proj", "down_proj"]


def _config(**kw):
    return MokaConfig(**{"r": 4, "target_modules": TARGETS, "init_weights": False,
                         "modalities": ["text", "visual", "audio"], **kw})


def _model(seed=0, **kw):
    torch.manual_seed(seed)
    return get_peft_model(tiny_llama(seed), _config(**kw))


def _adapted(seed, **kw):
    """The base of seed 0 with an adapter drawn from ``seed``: different adapters for one base."""
    base = tiny_llama(0)
    torch.manual_seed(seed)
    return get_peft_model(base, _config(**kw))


def _inputs(model):
    ids, question = sample_ids()
    embeds = model.get_base_model().get_input_embeddings()(torch.randint(3, 64, ids.shape))
    return ids, question, {"inputs_embeds": embeds, "attention_mask": (ids != P).long()}


def _logits(model, ids, question, kwargs):
    set_modality_ids(model, ids, question)
    with torch.no_grad():
        return model(**kwargs).logits


def test_registration_is_idempotent_and_a_real_peft_type():
    register_peft_method("moka", MokaConfig, MokaModel)   # again: a no-op
    register_peft_method("moka", MokaConfig, MokaModel)
    assert PeftType("MOKA") is PeftType.MOKA and PeftType.MOKA.value == "MOKA"
    assert MokaConfig().peft_type == PeftType.MOKA
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING

    assert PEFT_TYPE_TO_CONFIG_MAPPING[PeftType.MOKA] is MokaConfig
    assert PEFT_TYPE_TO_PREFIX_MAPPING[PeftType.MOKA] == "moka_"


def test_default_targets_per_model_family():
    model = get_peft_model(tiny_llama(), MokaConfig(r=2))
    adapted = {n.split(".")[-1] for n, m in model.named_modules() if hasattr(m, "moka_A")}
    assert adapted == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def _load_weights(path):
    if path.name.endswith(".safetensors"):
        return load_file(path)
    return torch.load(path, weights_only=True)


def _assert_same_adapter(model, loaded, name="default", loaded_name=None):
    saved = get_peft_model_state_dict(model, adapter_name=name)
    reloaded = get_peft_model_state_dict(loaded, adapter_name=loaded_name or name)
    assert saved and saved.keys() == reloaded.keys()
    assert all(torch.equal(value, reloaded[key]) for key, value in saved.items())


BASE_MODEL_FILES = {"model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "config.json",
                    "generation_config.json"}


@pytest.mark.parametrize("safe_serialization", [True, False])
def test_save_pretrained_and_reload_without_missing_keys(tmp_path, safe_serialization):
    """peft's _test_save_pretrained: only the adapter is written (its file holds exactly peft's
    adapter state dict, no base weight), the card says library peft, and from_pretrained restores
    the full state dict without a "Found missing adapter keys" warning."""
    model = _model(cross_attention="projected")
    ids, question, kwargs = _inputs(model)
    expected = _logits(model, ids, question, kwargs)
    model.save_pretrained(tmp_path, safe_serialization=safe_serialization)
    weights, other = "adapter_model.safetensors", "adapter_model.bin"
    if not safe_serialization:
        weights, other = other, weights
    files = set(os.listdir(tmp_path))
    assert {weights, "adapter_config.json", "README.md"} <= files
    assert other not in files and not files & BASE_MODEL_FILES
    on_disk = _load_weights(tmp_path / weights)
    adapter = get_peft_model_state_dict(model)
    assert on_disk.keys() == adapter.keys()
    assert all("moka_" in key and ".default" not in key for key in on_disk)
    assert all(torch.equal(on_disk[key], value) for key, value in adapter.items())
    saved_config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved_config["peft_type"] == "MOKA" and saved_config["cross_attention"] == "projected"
    assert ModelCard.load(tmp_path / "README.md").data.library_name == "peft"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = PeftModel.from_pretrained(tiny_llama(0), tmp_path)
    assert not [w for w in caught if "missing adapter keys" in str(w.message)]
    assert isinstance(loaded.peft_config["default"], MokaConfig)
    assert loaded.peft_config["default"].cross_attention == "projected"
    torch.testing.assert_close(_logits(loaded, ids, question, kwargs), expected)
    original, reloaded = model.state_dict(), loaded.state_dict()
    assert original.keys() == reloaded.keys()
    assert all(torch.equal(value, reloaded[key]) for key, value in original.items())


def test_save_pretrained_selected_adapters(tmp_path):
    """Only the selected adapters are written, each non-default one in a sub-folder named after
    it (as peft does), and each loads back with its own weights and outputs."""
    model = _adapted(1)
    model.add_adapter("proj", _config(cross_attention="projected"))
    model.add_adapter("uni", _config(r=2, variant="unimodal_lora"))
    ids, question, kwargs = _inputs(model)
    expected = {}
    for name in ("default", "proj", "uni"):
        model.set_adapter(name)
        expected[name] = _logits(model, ids, question, kwargs)
    assert not torch.allclose(expected["default"], expected["proj"])
    model.save_pretrained(tmp_path / "a", selected_adapters=["default", "uni"])
    model.save_pretrained(tmp_path / "b", selected_adapters=["proj"])
    assert {"adapter_model.safetensors", "adapter_config.json", "uni"} <= set(os.listdir(tmp_path / "a"))
    assert "proj" not in os.listdir(tmp_path / "a")
    assert {"adapter_model.safetensors", "adapter_config.json"} <= set(os.listdir(tmp_path / "a" / "uni"))
    assert not {"adapter_model.safetensors", "adapter_config.json", "default", "uni"} & set(os.listdir(tmp_path / "b"))
    assert {"adapter_model.safetensors", "adapter_config.json"} <= set(os.listdir(tmp_path / "b" / "proj"))
    with pytest.raises(ValueError, match="selected_adapters"):
        model.save_pretrained(tmp_path / "c", selected_adapters=["default", "missing"])
    assert not (tmp_path / "c").exists()

    loaded = PeftModel.from_pretrained(tiny_llama(0), tmp_path / "a")
    loaded.load_adapter(tmp_path / "a" / "uni", adapter_name="uni")
    loaded.load_adapter(tmp_path / "b" / "proj", adapter_name="proj")
    assert loaded.peft_config["uni"].variant == "unimodal_lora"
    assert loaded.peft_config["proj"].cross_attention == "projected"
    for name in ("default", "proj", "uni"):
        _assert_same_adapter(model, loaded, name)
        loaded.set_adapter(name)
        torch.testing.assert_close(_logits(loaded, ids, question, kwargs), expected[name])


def test_load_several_saved_adapters_into_one_model_and_switch(tmp_path):
    """peft's _test_load_multiple_adapters: adapters saved by separate models, loaded by name into
    one PeftModel (one of them twice), reproduce each saved model's outputs under set_adapter;
    loaded adapters are frozen unless is_trainable=True."""
    kinds = {"plain": {}, "proj": {"cross_attention": "projected"}, "gate": {"variant": "uni_mm_lora_gate"}}
    models = {name: _adapted(seed, **kw) for seed, (name, kw) in enumerate(kinds.items(), start=1)}
    ids, question, kwargs = _inputs(models["plain"])
    expected = {}
    for name, model in models.items():
        expected[name] = _logits(model, ids, question, kwargs)
        model.save_pretrained(tmp_path / name)
    assert not torch.allclose(expected["plain"], expected["gate"])
    loaded = PeftModel.from_pretrained(tiny_llama(0), tmp_path / "plain")
    loaded.load_adapter(tmp_path / "proj", adapter_name="proj")
    loaded.load_adapter(tmp_path / "gate", adapter_name="gate", is_trainable=True)
    loaded.load_adapter(tmp_path / "plain", adapter_name="again")
    assert set(loaded.peft_config) == {"default", "proj", "gate", "again"}
    assert loaded.active_adapter == "default"   # load_adapter does not switch
    trainable = {n for n, p in loaded.named_parameters() if p.requires_grad}
    assert trainable and all("moka_" in n and n.endswith(".gate") for n in trainable)
    for name, saved in (("default", "plain"), ("proj", "proj"), ("gate", "gate"), ("again", "plain")):
        loaded.set_adapter(name)
        assert loaded.active_adapters == [name]
        torch.testing.assert_close(_logits(loaded, ids, question, kwargs), expected[saved])
        _assert_same_adapter(models[saved], loaded, "default", name)


FRESH = """
import sys, torch
import mllm
from peft import PeftModel
from mllm.modality_context import set_modality_ids
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


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("autocast", [True, False])
def test_adapter_dtype_autocast(tmp_path, dtype, autocast):
    """peft's test_adapter_dtype_autocast: on a half-precision base every MokA parameter (all of
    MokaLayer.adapter_layer_names; MokA has no tuner-level parameters) is float32 with
    autocast_adapter_dtype=True and the base dtype with False, through get_peft_model, add_adapter,
    from_pretrained and load_adapter (also with low_cpu_mem_usage, and from a checkpoint saved in
    the other dtype); the base stays in its dtype."""
    base_names = set(tiny_llama().state_dict())

    def check(model, adapters, autocast):
        kinds = set()
        for name, param in model.named_parameters():
            original = name.removeprefix("base_model.model.").replace(".base_layer", "")
            if original in base_names:
                assert param.dtype == dtype, name
            else:   # every other parameter is a layer's moka_* entry of a known adapter
                kind, adapter = name.split(".")[-2:]
                assert kind in MokaLayer.adapter_layer_names and adapter in adapters, name
                assert param.dtype == (torch.float32 if autocast else dtype), name
                kinds.add(kind)
        return kinds

    torch.manual_seed(3)
    model = get_peft_model(tiny_llama(dtype=dtype), _config(cross_attention="projected"),
                           autocast_adapter_dtype=autocast)
    check(model, {"default"}, autocast)
    model.add_adapter("gated", _config(variant="uni_mm_lora_gate"), autocast_adapter_dtype=autocast)
    assert check(model, {"default", "gated"}, autocast) == set(MokaLayer.adapter_layer_names)
    ids, question, kwargs = _inputs(model)
    expected = {}
    for name in ("default", "gated"):
        model.set_adapter(name)
        expected[name] = _logits(model, ids, question, kwargs)
    model.save_pretrained(tmp_path)
    for load_autocast in (autocast, not autocast):
        for low_cpu_mem_usage in (False, True):
            options = {"autocast_adapter_dtype": load_autocast, "low_cpu_mem_usage": low_cpu_mem_usage}
            loaded = PeftModel.from_pretrained(tiny_llama(dtype=dtype), tmp_path, **options)
            check(loaded, {"default"}, load_autocast)
            loaded.load_adapter(tmp_path / "gated", adapter_name="gated", **options)
            assert check(loaded, {"default", "gated"}, load_autocast) == set(MokaLayer.adapter_layer_names)
            if load_autocast != autocast:
                continue   # the weights were rounded to another dtype: only the dtypes are checked
            for name in ("default", "gated"):
                _assert_same_adapter(model, loaded, name)
                loaded.set_adapter(name)
                torch.testing.assert_close(_logits(loaded, ids, question, kwargs), expected[name])


def test_from_pretrained_with_a_config_object_and_is_trainable(tmp_path):
    """peft's _test_from_pretrained_config_construction and test_parameters_after_loading_model:
    a given config object is used as is; is_trainable=False loads a frozen adapter in inference
    mode, is_trainable=True makes exactly the adapter's parameters trainable."""
    model = _model()
    model.save_pretrained(tmp_path)
    config = _config()
    loaded = PeftModel.from_pretrained(tiny_llama(0), tmp_path, config=config, is_trainable=False)
    assert loaded.peft_config["default"] is config and config.inference_mode
    assert not any(p.requires_grad for p in loaded.parameters())
    _assert_same_adapter(model, loaded)
    trainable = PeftModel.from_pretrained(tiny_llama(0), tmp_path, is_trainable=True)
    assert not trainable.peft_config["default"].inference_mode
    names = {n for n, p in trainable.named_parameters() if p.requires_grad}
    assert names == {n for n, _ in trainable.named_parameters() if "moka_" in n} and names


def test_low_cpu_mem_usage_and_inject_adapter_in_model_load_on_meta(tmp_path):
    """peft's _test_load_model_low_cpu_mem_usage (MokA keeps no tuner-level state, so
    inject_adapter_in_model applies): adapters created on the meta device and filled from the
    checkpoint leave no meta parameter and give the saved outputs."""
    from peft import inject_adapter_in_model, set_peft_model_state_dict

    model = _model()
    ids, question, kwargs = _inputs(model)
    expected = _logits(model, ids, question, kwargs)
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_llama(0), tmp_path, low_cpu_mem_usage=True)
    assert {p.device.type for p in loaded.parameters()} == {"cpu"}
    torch.testing.assert_close(_logits(loaded, ids, question, kwargs), expected)

    plain = inject_adapter_in_model(_config(), tiny_llama(0), low_cpu_mem_usage=True)
    assert {p.device.type for p in plain.parameters()} == {"meta", "cpu"}
    result = set_peft_model_state_dict(plain, load_file(tmp_path / "adapter_model.safetensors"),
                                       low_cpu_mem_usage=True)
    assert not result.unexpected_keys and not [k for k in result.missing_keys if "moka_" in k]
    assert {p.device.type for p in plain.parameters()} == {"cpu"}
    torch.testing.assert_close(_logits(plain, ids, question, kwargs), expected)


def _per_adapter_dicts(layer, adapter):
    """Names of the layer's dict-like attributes (plain dicts, ModuleDicts, ParameterDicts) keyed by ``adapter``."""
    found = []
    for attr, value in {**vars(layer), **layer._modules, **layer._parameters}.items():
        if isinstance(value, (dict, torch.nn.ModuleDict, torch.nn.ParameterDict)) and adapter in value:
            found.append(attr)
    return found


def test_delete_adapter_cleans_up_after_itself():
    """peft's test_delete_adapter_properly_cleans_up_after_itself and test_active_adapter: deleting
    the active adapter switches to the remaining one and leaves no entry of it in any layer dict,
    the config or the state dict."""
    model = _model()
    ids, question, kwargs = _inputs(model)
    first = _logits(model, ids, question, kwargs)
    model.add_adapter("projected", _config(cross_attention="projected"))
    model.set_adapter("projected")
    assert model.active_adapter == "projected" and model.active_adapters == ["projected"]
    layers = [m for m in model.modules() if isinstance(m, MokaLayer)]
    assert layers and all(m.active_adapters == ["projected"] for m in layers)
    # Every per-adapter dict of a layer (registered or plain attribute) holds "projected" ...
    listed = set(MokaLayer.adapter_layer_names + MokaLayer.other_param_names) - {"moka_gate"}  # gate: other variant
    assert all(set(_per_adapter_dicts(m, "projected")) == listed for m in layers)
    model.delete_adapter("projected")
    assert model.active_adapters == ["default"] and set(model.peft_config) == {"default"}
    assert all(m.active_adapters == ["default"] for m in layers)
    # ... and none does after the delete.
    assert not [m for m in layers if _per_adapter_dicts(m, "projected")]
    assert not [k for k in model.state_dict() if k.endswith(".projected")]
    torch.testing.assert_close(_logits(model, ids, question, kwargs), first)


def test_several_active_adapters_add_their_outputs():
    """Two adapters active at once (base_model.set_adapter with a list, as peft's multi-adapter
    tests do): on one Linear the output is the base plus each adapter's own update."""
    torch.manual_seed(4)
    model = get_peft_model(OneLinear(), _config(target_modules=["proj"]))
    model.add_adapter("projected", _config(target_modules=["proj"], cross_attention="projected"))
    ids, question = sample_ids()
    set_modality_ids(model, ids, question)
    x = torch.randn(2, 10, 12)
    with torch.no_grad():
        base = model.base_model.model.proj.base_layer(x)
        deltas = []
        for name in ("default", "projected"):
            model.set_adapter(name)
            deltas.append(model(x) - base)
        model.base_model.set_adapter(["default", "projected"])
        both = model(x)
    assert model.active_adapters == ["default", "projected"]
    assert deltas[0].abs().max() > 1e-2 and deltas[1].abs().max() > 1e-2
    torch.testing.assert_close(both, base + deltas[0] + deltas[1], rtol=1e-5, atol=1e-5)


def test_base_model_state_dict_has_the_original_keys():
    """peft's _test_get_base_model_state_dict: get_base_model_state_dict gives the plain model's
    keys and weights (no moka_ entry, no base_layer infix), and set_base_model_state_dict loads
    another base's weights without touching the adapter."""
    from peft.utils.save_and_load import (
        get_base_model_state_dict,
        set_base_model_state_dict,
    )

    model = _model()
    plain = tiny_llama(0).state_dict()
    base_state = get_base_model_state_dict(model)
    assert base_state.keys() == plain.keys()
    assert all(torch.equal(value, plain[key]) for key, value in base_state.items())
    adapter = {k: v.clone() for k, v in get_peft_model_state_dict(model).items()}
    other = tiny_llama(5).state_dict()
    set_base_model_state_dict(model, other, strict=True)
    assert all(torch.equal(value, other[key]) for key, value in get_base_model_state_dict(model).items())
    assert all(torch.equal(value, adapter[key]) for key, value in get_peft_model_state_dict(model).items())


def test_layers_to_transform_and_exclude_modules_select_the_adapted_layers():
    """peft's _test_training_layer_indexing: layers_to_transform / layers_pattern restrict the
    adapter to the named decoder layers (exactly their adapter parameters train), and
    exclude_modules removes modules from "all-linear"."""
    config = _config(target_modules=["q_proj", "v_proj"], layers_to_transform=[1], layers_pattern="layers")
    model = get_peft_model(tiny_llama(layers=3), config)
    adapted = sorted(n for n, m in model.named_modules() if isinstance(m, MokaLayer))
    assert adapted == [f"base_model.model.model.layers.1.self_attn.{p}" for p in ("q_proj", "v_proj")]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith(tuple(adapted)) and "moka_" in n for n in trainable)
    model = get_peft_model(tiny_llama(), _config(target_modules="all-linear", exclude_modules=["down_proj"]))
    kinds = {n.split(".")[-1] for n, m in model.named_modules() if isinstance(m, MokaLayer)}
    assert kinds == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj"}   # lm_head stays out


def test_adapter_on_other_targets_stays_inactive_until_set():
    """A second adapter on modules the active one does not target must not switch those modules
    on (peft re-applies the active adapter after injection): outputs are unchanged until set_adapter."""
    model = _model(target_modules=["q_proj"])
    ids, question, kwargs = _inputs(model)
    first = _logits(model, ids, question, kwargs)
    model.add_adapter("other", _config(target_modules=["k_proj", "up_proj"]))
    assert torch.equal(_logits(model, ids, question, kwargs), first)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith(".default") for n in trainable)
    model.set_adapter("other")
    assert not torch.allclose(_logits(model, ids, question, kwargs), first)
    assert all(n.endswith(".other") for n, p in model.named_parameters() if p.requires_grad)
