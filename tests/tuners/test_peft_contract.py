"""peft's contract, checked for every tuner in ``contract_cases.CASES`` (issue 13, item 5).

In the manner of peft's tests/test_custom_models.py: identity at init, save/load in a fresh
process (safetensors and pickle, two adapters, modules_to_save), low_cpu_mem_usage, adapter dtype
with autocast_adapter_dtype on and off in fp32/fp16/bf16, disable_adapter, several adapters with
set_adapter and delete_adapter, training that moves only adapter parameters (and the
modules_to_save copy), gradient checkpointing (reentrant and not) with the same gradients, and
merge_and_unload where the tuner merges -- a clear refusal where it does not by design.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
import torch
from peft import PeftModel, get_peft_model, inject_adapter_in_model
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import load_peft_weights, set_peft_model_state_dict

from tests.tuners.contract_cases import CASES, Case, infer, run

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
HALF = (torch.float16, torch.bfloat16)

every_tuner = pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])


def _cases(where):
    """The cases a check applies to (e.g. mergeable ones), for a pair of tests: the behaviour
    where the tuner supports it, the clear refusal where it does not by design."""
    chosen = [case for case in CASES if where(case)]
    return pytest.mark.parametrize("case", chosen, ids=[case.name for case in chosen])


def adapted(case: Case, *, init: bool = False, seed: int = 0, dtype: torch.dtype = torch.float32,
            modules_to_save: bool = False, base=None, **peft_kwargs) -> PeftModel:
    """The case's base model with an adapter drawn from ``seed`` (init=False: non-identity)."""
    fields = {"modules_to_save": [case.modules_to_save]} if modules_to_save else {}
    base = case.model(dtype) if base is None else base
    torch.manual_seed(100 + seed)
    return get_peft_model(base, case.config(init, **fields), **peft_kwargs)


def add_adapter(case: Case, model: PeftModel, name: str, seed: int, **fields) -> None:
    torch.manual_seed(100 + seed)
    model.add_adapter(name, case.config(False, **fields))


def adapter_names_in(model) -> set[str]:
    return {n for n, _ in model.named_parameters()} | {n for n, _ in model.named_buffers()}


@every_tuner
def test_identity_at_init_and_a_visible_update_otherwise(case):
    base = infer(case, case.model(torch.float32))
    torch.testing.assert_close(infer(case, adapted(case, init=True).eval()), base)
    assert not torch.allclose(infer(case, adapted(case, init=False).eval()), base, atol=1e-4)


def save_for_a_fresh_process(case: Case, folder) -> None:
    """Two adapters with modules_to_save, saved as safetensors and as pickle, with the outputs the
    fresh process must reproduce (``contract_cases.check_fresh``)."""
    model = adapted(case, modules_to_save=True).eval()
    add_adapter(case, model, "other", seed=1, modules_to_save=[case.modules_to_save])
    with torch.no_grad():  # the saved module copies must differ from the base's to be seen
        for name, param in model.named_parameters():
            if ".modules_to_save." in name:
                param.add_(torch.randn_like(param) * 0.1)
    expected = {"default": infer(case, model)}
    model.set_adapter("other")
    expected["other"] = infer(case, model)
    assert not torch.allclose(expected["default"], expected["other"])
    model.set_adapter("default")
    model.save_pretrained(folder / "safetensors")
    model.save_pretrained(folder / "pickle", safe_serialization=False)
    for kind, weights in (("safetensors", "adapter_model.safetensors"), ("pickle", "adapter_model.bin")):
        for where in (folder / kind, folder / kind / "other"):
            assert {"adapter_config.json", weights} <= set(os.listdir(where)), os.listdir(where)
    torch.save(expected, folder / "expected.pt")


@pytest.fixture(scope="module")
def fresh_process_results(tmp_path_factory):
    """Every case saved here, then reloaded by ONE fresh process (importing torch, transformers and
    peft costs more than all the checks): case name -> {"checks", "error"}."""
    root = tmp_path_factory.mktemp("contract")
    results, saved = {}, []
    for case in CASES:
        try:
            save_for_a_fresh_process(case, root / case.name)
            saved.append(case.name)
        except Exception as error:  # reported by that case's test
            results[case.name] = {"checks": {}, "error": f"saving failed: {error!r}"}
    env = {**os.environ, "PYTHONPATH": ROOT, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-m", "tests.tuners.contract_cases", str(root), *saved],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    results.update(json.loads(done.stdout.strip().splitlines()[-1]))
    return results


@every_tuner
def test_save_and_load_in_a_fresh_process(case, fresh_process_results):
    """safetensors and pickle, two adapters, modules_to_save, and low_cpu_mem_usage, loaded by a
    process that imports nothing but the case table."""
    result = fresh_process_results[case.name]
    assert result["error"] is None, result["error"]
    assert len(result["checks"]) == 3 and all(result["checks"].values()), result["checks"]


@every_tuner
def test_low_cpu_mem_usage_builds_on_meta_and_loads_the_weights(case, tmp_path):
    model = adapted(case).eval()
    expected = infer(case, model)
    model.save_pretrained(tmp_path)
    empty = get_peft_model(case.model(torch.float32), case.config(False), low_cpu_mem_usage=True)
    assert any(p.device.type == "meta" for n, p in empty.named_parameters() if case.prefix in n)
    set_peft_model_state_dict(empty, load_peft_weights(str(tmp_path)), low_cpu_mem_usage=True)
    assert not [n for n, p in empty.named_parameters() if p.device.type == "meta"]
    torch.testing.assert_close(infer(case, empty.eval()), expected)
    # load_adapter with low_cpu_mem_usage, as a second adapter of a live model
    model.load_adapter(str(tmp_path), adapter_name="again", low_cpu_mem_usage=True)
    model.set_adapter("again")
    torch.testing.assert_close(infer(case, model), expected)


@_cases(lambda case: case.injectable)
def test_inject_adapter_in_model_with_low_cpu_mem_usage(case, tmp_path):
    """peft's low-level API (also transformers' native load_adapter): inject on meta, then load."""
    model = adapted(case).eval()
    expected = infer(case, model)
    model.save_pretrained(tmp_path)
    injected = inject_adapter_in_model(case.config(False), case.model(torch.float32), low_cpu_mem_usage=True)
    assert any(p.device.type == "meta" for n, p in injected.named_parameters() if case.prefix in n)
    loaded = set_peft_model_state_dict(injected, load_peft_weights(str(tmp_path)), low_cpu_mem_usage=True)
    assert not loaded.unexpected_keys
    assert not [n for n, p in injected.named_parameters() if p.device.type == "meta"]
    torch.testing.assert_close(infer(case, injected.eval()), expected)


@_cases(lambda case: not case.injectable)
def test_inject_adapter_in_model_is_refused_by_design_for_tuner_held_state(case):
    """MoRA's shared factors and DeLo's query maps and Task-Key Memory live on the tuner, which
    inject_adapter_in_model does not keep: peft refuses, naming get_peft_model."""
    with pytest.raises(ValueError, match="shared state stored on the tuner.*get_peft_model"):
        inject_adapter_in_model(case.config(False), case.model(torch.float32))


@every_tuner
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("autocast", [True, False], ids=["autocast", "no_autocast"])
def test_adapter_dtype_follows_autocast_adapter_dtype(case, dtype, autocast, tmp_path):
    """As peft's LoRA: fp16/bf16 adapters are upcast to fp32 when autocast_adapter_dtype is on, and
    keep the base dtype when it is off; either way the forward runs and returns the base dtype."""
    want = torch.float32 if autocast and dtype in HALF else dtype
    model = adapted(case, dtype=dtype, autocast_adapter_dtype=autocast)
    assert {p.dtype for n, p in model.named_parameters() if case.prefix in n} == {want}
    model.train()
    out = run(case, model, dtype)
    assert out.dtype == dtype and torch.isfinite(out).all()
    out.float().pow(2).mean().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0
               for n, p in model.named_parameters() if case.prefix in n)
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(case.model(dtype), tmp_path, autocast_adapter_dtype=autocast).eval()
    assert {p.dtype for n, p in loaded.named_parameters() if case.prefix in n} == {want}
    with torch.no_grad():
        again = run(case, loaded, dtype)
    assert again.dtype == dtype and torch.isfinite(again).all()


@every_tuner
def test_disable_adapter_gives_the_base_model_and_comes_back(case):
    base = infer(case, case.model(torch.float32))
    model = adapted(case).eval()
    with_adapter = infer(case, model)
    with model.disable_adapter():
        torch.testing.assert_close(infer(case, model), base)
    torch.testing.assert_close(infer(case, model), with_adapter)


@every_tuner
def test_several_adapters_set_adapter_and_delete_adapter(case):
    model = adapted(case).eval()
    first = infer(case, model)
    add_adapter(case, model, "other", seed=1)
    torch.testing.assert_close(infer(case, model), first)       # adding does not activate
    model.set_adapter("other")
    second = infer(case, model)
    assert not torch.allclose(first, second, atol=1e-4)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(re.search(r"(^|\.)other(\.|$)", n) for n in trainable), trainable
    model.set_adapter("default")
    torch.testing.assert_close(infer(case, model), first)
    model.delete_adapter("other")
    assert "other" not in model.peft_config
    assert not [n for n in adapter_names_in(model) if re.search(r"(^|\.)other(\.|$)", n)]
    torch.testing.assert_close(infer(case, model), first)


@every_tuner
def test_training_moves_only_adapter_parameters_and_the_modules_to_save_copy(case):
    model = adapted(case, modules_to_save=True).train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(case.prefix in n or ".modules_to_save." in n for n in trainable), trainable
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    for _ in range(3):
        optimizer.zero_grad()
        run(case, model).float().pow(2).mean().backward()
        optimizer.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed <= trainable, changed - trainable
    assert any(case.prefix in n for n in changed)
    assert any(".modules_to_save." in n for n in changed)


@every_tuner
@pytest.mark.parametrize("reentrant", [False, True], ids=["non_reentrant", "reentrant"])
def test_gradient_checkpointing_gives_the_same_gradients(case, reentrant):
    grads = []
    for checkpointing in (False, True):
        base = case.model(torch.float32)
        if checkpointing:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
        model = adapted(case, base=base).train()
        run(case, model).pow(2).mean().backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    plain, checkpointed = grads
    assert plain.keys() == checkpointed.keys()
    assert any(case.prefix in n and g is not None and g.abs().sum() > 0 for n, g in plain.items())
    for name, grad in plain.items():
        if grad is None:
            assert checkpointed[name] is None, name
        else:
            torch.testing.assert_close(checkpointed[name], grad, rtol=1e-5, atol=1e-6, msg=name)


@_cases(lambda case: case.mergeable)
def test_merge_and_unload_equals_the_adapted_model(case):
    model = adapted(case).eval()
    expected = infer(case, model)
    model.merge_adapter()
    torch.testing.assert_close(infer(case, model), expected, rtol=1e-5, atol=1e-5)
    model.unmerge_adapter()
    torch.testing.assert_close(infer(case, model), expected, rtol=1e-5, atol=1e-5)
    merged = model.merge_and_unload()
    assert not any(isinstance(m, BaseTunerLayer) for m in merged.modules())
    torch.testing.assert_close(infer(case, merged), expected, rtol=1e-5, atol=1e-5)


@_cases(lambda case: not case.mergeable)
def test_merge_is_refused_by_design_with_a_clear_error(case):
    """Per-token (MokA) or per-sample (DeLo) updates are not one weight matrix."""
    model = adapted(case).eval()
    expected = infer(case, model)
    for merge in (model.merge_and_unload, model.merge_adapter):
        with pytest.raises(NotImplementedError, match="cannot be merged into the base weights"):
            merge()
    assert any(isinstance(m, BaseTunerLayer) for m in model.modules())     # nothing half merged
    torch.testing.assert_close(infer(case, model), expected)
