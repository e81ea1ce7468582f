"""The CMML loop with DeLo on generated, separable tasks: task partitioning (heads included),
task-agnostic evaluation through the Task-Key Memory, the result matrix, classifier save/load."""

from __future__ import annotations

import math

import torch

import mllm  # noqa: F401
from mllm.continual import CmmlBatch, DeloClassifier, evaluate_task, train_task
from mllm.metrics.continual import ResultMatrix
from mllm.tuners.delo import IMAGE_MISSING, TEXT_MISSING, task_parameter_names
from tests.tuners.delo_helpers import delo_vilt, tiny_vilt, vilt_inputs

LABELS = 2


def _batches(task: int, n: int, seed: int) -> list[CmmlBatch]:
    out = []
    for k in range(n):
        inputs = vilt_inputs(batch=4, text_len=8, seed=100 * task + 10 * seed + k, shift=3.0 if task == 0 else -3.0,
                             token_offset=0 if task == 0 else 56, vocab_width=6)
        labels = task * LABELS + (inputs["input_ids"][:, 0] % LABELS)     # a class per task from the text
        missing = torch.tensor([0, TEXT_MISSING, IMAGE_MISSING, 0])
        out.append(CmmlBatch(inputs, labels, missing))
    return out


def _classifier():
    torch.manual_seed(3)
    return DeloClassifier(delo_vilt(num_tasks=2, init_weights=True), num_tasks=2, labels_per_task=LABELS)


def test_continual_run_keeps_task_1_fixed_and_fills_the_result_matrix():
    model = _classifier()
    tasks = [(_batches(t, 2, seed=0), _batches(t, 1, seed=1)) for t in range(2)]
    matrix = ResultMatrix(2)
    losses = train_task(model, 0, tasks[0][0], epochs=2, lr=1e-2)
    assert all(math.isfinite(v) for v in losses)
    matrix.record(0, 0, evaluate_task(model, tasks[0][1]))
    names = set(task_parameter_names(model, 0)) | {n for n, _ in model.named_parameters() if n.startswith("heads.0.")}
    before = {k: v.clone() for k, v in model.state_dict().items() if k in names}
    keys_before = model.tuner.delo_query["default"].keys[0].clone()

    train_task(model, 1, tasks[1][0], epochs=2, lr=1e-2)
    after = model.state_dict()
    assert len(before) == 2 * 3 * 6 + 2 + 2
    for name, value in before.items():
        assert torch.equal(value, after[name]), name
    assert torch.equal(model.tuner.delo_query["default"].keys[0], keys_before)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == \
        set(task_parameter_names(model, 1)) | {"heads.1.weight", "heads.1.bias"}

    for j in range(2):
        matrix.record(1, j, evaluate_task(model, tasks[j][1]))
        # no task id was given: the memory routed every test sample to its own task
        assert model.tuner.state.task_ids.tolist() == [j] * 4
    summary = matrix.summary()
    assert all(math.isfinite(summary[k]) for k in ("average", "forgetting", "last"))
    assert model.seen_classes == 4


def test_classifier_save_and_reload_gives_identical_logits(tmp_path):
    model = _classifier()
    for task in range(2):
        train_task(model, task, _batches(task, 1, seed=0), epochs=1, lr=1e-2)
    model.eval()
    batch = _batches(1, 1, seed=5)[0]
    with torch.no_grad():
        expected = model(batch.inputs, batch.missing)
    model.save_pretrained(str(tmp_path))
    reloaded = DeloClassifier.from_pretrained(tiny_vilt(), str(tmp_path))
    with torch.no_grad():
        got = reloaded(batch.inputs, batch.missing)
    assert reloaded.task == 1
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


def test_memory_head_selection_masks_the_other_tasks_logits():
    from mllm.continual.cmml import MASKED_LOGIT

    model = _classifier()
    for task in range(2):
        train_task(model, task, _batches(task, 1, seed=0), epochs=1, lr=1e-2)
    model.eval()
    batch = _batches(0, 1, seed=7)[0]
    with torch.no_grad():
        masked = model(batch.inputs, batch.missing)
        routed = model.tuner.state.task_ids.clone()
        model.head_selection = "all"
        full = model(batch.inputs, batch.missing)
    for sample, task in enumerate(routed.tolist()):
        own = slice(task * LABELS, (task + 1) * LABELS)
        torch.testing.assert_close(masked[sample, own], full[sample, own], rtol=0, atol=0)
        others = torch.ones(masked.shape[1], dtype=torch.bool)
        others[own] = False
        assert (masked[sample, others] == MASKED_LOGIT).all()
    model.train()            # training logits are never masked (the loss sees every head)
    assert not (model(batch.inputs, batch.missing) == MASKED_LOGIT).any()


def test_sequential_lora_baseline_trains_one_shared_adapter_and_the_current_head(tmp_path):
    from peft import LoraConfig, get_peft_model

    from mllm.continual import SequentialLoraClassifier

    torch.manual_seed(3)
    model = SequentialLoraClassifier(get_peft_model(tiny_vilt(), LoraConfig(r=2, lora_alpha=2, target_modules=[
        "query", "key", "value"])), num_tasks=2, labels_per_task=LABELS)
    lora_names = {n for n, _ in model.named_parameters() if "lora_" in n}
    assert lora_names
    train_task(model, 0, _batches(0, 1, seed=0), epochs=1, lr=1e-2)
    head0 = {k: v.clone() for k, v in model.heads[0].state_dict().items()}
    lora0 = {n: p.detach().clone() for n, p in model.named_parameters() if n in lora_names}
    train_task(model, 1, _batches(1, 1, seed=0), epochs=1, lr=1e-2)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == lora_names | {"heads.1.weight",
                                                                                       "heads.1.bias"}
    assert all(torch.equal(v, model.heads[0].state_dict()[k]) for k, v in head0.items())     # old head frozen
    assert any(not torch.equal(v, dict(model.named_parameters())[n]) for n, v in lora0.items())  # adapter moved on
    model.eval()
    batch = _batches(1, 1, seed=5)[0]
    with torch.no_grad():
        expected = model(batch.inputs, batch.missing)
    assert expected.shape == (4, 2 * LABELS)
    model.save_pretrained(str(tmp_path))
    reloaded = SequentialLoraClassifier.from_pretrained(tiny_vilt(), str(tmp_path))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(batch.inputs, batch.missing), expected, rtol=0, atol=1e-6)
    try:
        DeloClassifier.from_pretrained(tiny_vilt(), str(tmp_path))
    except ValueError as e:
        assert "'lora' classifier" in str(e)
    else:
        raise AssertionError("a LoRA checkpoint loaded as DeLo")
