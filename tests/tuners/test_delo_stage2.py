"""Stage 2 with ``tuner: delo`` inside the MLLM's LLM (per-token modality ids from the
MultimodalLM's tracking context): trains, saves and reloads with identical generations; runs as
task k of a task sequence (``tuner.options.task``, ``model.continue_from``) leaving earlier tasks intact."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from peft import LoraConfig

from mllm.config import ConfigError, config_from_dict
from mllm.data.dataset import MultimodalCollator, MultimodalDataset
from mllm.model import MultimodalLM
from mllm.train.stages import run_instruct
from mllm.tuners.delo import DeloConfig, task_parameter_names
from tests.train.test_stages import _config, assert_same_trained_weights, generate_token_ids, stage1_dir  # noqa: F401  (module fixture)

TUNER_YAML = """
tuner:
  type: delo
  r: 2
  alpha: 4
  dropout: 0.0
  options:
    num_experts: 4
    num_tasks: 2
"""


def test_yaml_selects_delo_and_stage2_trains_saves_and_reloads(tiny_assets, demo_data, stage1_dir, tmp_path):
    cfg = _config(tiny_assets, demo_data, tmp_path, "instruct", pretrained_projectors=stage1_dir, max_steps=1)
    cfg.tuner = config_from_dict(yaml.safe_load(TUNER_YAML)).tuner
    model = run_instruct(cfg)
    tuner = model.llm.base_model
    assert type(tuner).__name__ == "DeloModel"
    trained = {n: p for n, p in model.llm.named_parameters() if p.requires_grad}
    assert trained and all("delo_" in n and n.endswith(".0") for n in trained)   # task 0 only
    assert any(bool(p.abs().sum() > 0) for n, p in trained.items() if ".b_" in n)
    assert tuner.delo_query["default"].counts[0].sum() > 0 and tuner.delo_query["default"].counts[1].sum() == 0
    live = generate_token_ids(model, demo_data["eval"], demo_data["media_root"])
    reloaded = MultimodalLM.from_pretrained(str(tmp_path))
    assert reloaded.tuner_config.type == "delo"
    assert generate_token_ids(reloaded, demo_data["eval"], demo_data["media_root"]) == live


# -- stage 2 across a sequence of tasks (tuner.options.task, model.continue_from) ------------------------

def _split_by_question(demo_data, out_dir) -> tuple[str, str]:
    """Two instruction-tuning tasks from the demo data: colour questions, then everything else."""
    records = [json.loads(line) for line in open(demo_data["instruct"])]
    first_question = [r["conversations"][0]["value"] for r in records]
    paths = []
    for task, keep in enumerate((lambda q: "color" in q, lambda q: "color" not in q)):
        path = out_dir / f"task{task}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r, q in zip(records, first_question) if keep(q)))
        paths.append(str(path))
    return paths[0], paths[1]


def _task_config(tiny_assets, demo_data, output_dir, train, task=0, continue_from=None, stage1=None, **training):
    cfg = _config(tiny_assets, demo_data, output_dir, "instruct", pretrained_projectors=stage1, **training)
    cfg.tuner = config_from_dict(yaml.safe_load(TUNER_YAML)).tuner
    cfg.tuner.options["task"], cfg.model.continue_from = task, continue_from
    cfg.data.train = train
    return cfg


@pytest.fixture(scope="module")
def task_data(demo_data, tmp_path_factory):
    return _split_by_question(demo_data, tmp_path_factory.mktemp("tasks"))


@pytest.fixture(scope="module")
def task0(tiny_assets, demo_data, stage1_dir, task_data, tmp_path_factory):
    """Task 0's stage-2 output folder and the model it trained."""
    out = tmp_path_factory.mktemp("task0")
    model = run_instruct(_task_config(tiny_assets, demo_data, out, task_data[0], stage1=stage1_dir, max_steps=1))
    return str(out), model


def _logits(model, train_path, media_root, task):
    """Logits of the first 4 training records, every sample routed to ``task``."""
    dataset = MultimodalDataset(train_path, model.tokenizer, model.media_specs(), media_root=media_root,
                                progress=False)
    batch = MultimodalCollator(model.tokenizer.pad_token_id, "right")([dataset[i] for i in range(4)])
    batch.pop("labels", None)
    model.eval()
    model.llm.base_model.force_task(task)
    try:
        with torch.no_grad():
            return model(**batch).logits
    finally:
        model.llm.base_model.force_task(None)


def test_task1_continues_task0_and_leaves_task0_bit_for_bit(tiny_assets, demo_data, task_data, task0, tmp_path):
    task0_dir, model0 = task0
    out = tmp_path / "task1"
    cfg = _task_config(tiny_assets, demo_data, out, task_data[1], task=1, continue_from=task0_dir,
                       max_steps=2, save_steps=1)
    model1 = run_instruct(cfg)
    tuner0, tuner1 = model0.llm.base_model, model1.llm.base_model
    assert tuner1.current_task == 1 and model1.llm.peft_config["default"].task == 1

    # Only task 1's pools, routers and query maps trained; projectors frozen.
    task1_names = set(task_parameter_names(model1.llm, 1))
    assert task1_names and {n for n, p in model1.named_parameters() if p.requires_grad} == \
        {f"llm.{n}" for n in task1_names}
    # Everything else -- LLM, task-0 pools / routers / query maps, projectors -- bit-for-bit task 0's.
    state0, state1 = model0.state_dict(), model1.state_dict()
    assert state0.keys() == state1.keys()
    memory = {k for k in state1 if ".delo_query." in k and k.endswith((".keys", ".counts"))}
    assert len(memory) == 2
    for key in state1.keys() - memory - {f"llm.{n}" for n in task1_names}:
        assert torch.equal(state0[key], state1[key]), key
    assert any(k.startswith("projectors.") for k in state1)
    # Task 1 trained: its expert pools, routers and query maps all moved.
    changed = {n.split(".")[-2] for n in task1_names if not torch.equal(state0[f"llm.{n}"], state1[f"llm.{n}"])}
    assert {"a_visual", "a_text", "b_visual", "b_text", "router_visual", "router_text",
            "proj_visual", "proj_text"} <= changed
    # Task-Key Memory: task 0's keys and counts kept, task 1's added.
    queries0, queries1 = tuner0.delo_query["default"], tuner1.delo_query["default"]
    assert torch.equal(queries1.keys[0], queries0.keys[0]) and torch.equal(queries1.counts[0], queries0.counts[0])
    assert queries0.counts[1].sum() == 0 and queries1.counts[1].sum() > 0
    assert (queries1.counts.sum(-1) > 0).tolist() == [True, True]

    # Forcing task 0 on the task-1 model gives exactly the task-0 model's logits; task 1 differs.
    for path in task_data:
        want = _logits(model0, path, demo_data["media_root"], 0)
        assert torch.equal(_logits(model1, path, demo_data["media_root"], 0), want)
        assert not torch.equal(_logits(model1, path, demo_data["media_root"], 1), want)

    # The output reloads with the same generations (Task-Key Memory picks the task per sample).
    live = generate_token_ids(model1, demo_data["eval"], demo_data["media_root"])
    reloaded = MultimodalLM.from_pretrained(str(out))
    assert reloaded.llm.peft_config["default"].task == 1
    assert yaml.safe_load((out / "experiment.yaml").read_text())["model"]["continue_from"] == task0_dir
    assert torch.equal(reloaded.llm.base_model.delo_query["default"].counts, queries1.counts)
    assert generate_token_ids(reloaded, demo_data["eval"], demo_data["media_root"]) == live

    # Resuming task 1 from its Trainer checkpoint ends where the straight run ended.
    resumed_cfg = _task_config(tiny_assets, demo_data, tmp_path / "resumed", task_data[1], task=1,
                               continue_from=task0_dir, max_steps=2, save_steps=1,
                               resume_from_checkpoint=str(out / "checkpoint-1"))
    resumed = run_instruct(resumed_cfg)
    assert_same_trained_weights(resumed, model1)
    resumed_state = resumed.state_dict()
    assert all(torch.equal(resumed_state[k], state1[k]) for k in state1.keys() - {f"llm.{n}" for n in task1_names})


def test_task_sequence_errors_name_the_field(tiny_assets, demo_data, stage1_dir, task_data, task0, tmp_path):
    task0_dir, _ = task0
    with pytest.raises(ValueError, match=r"task=2 is out of range for num_tasks=2"):
        DeloConfig(num_tasks=2, task=2)
    with pytest.raises(ValueError, match=r"task=-1 is out of range"):
        DeloConfig(num_tasks=2, task=-1)
    with pytest.raises(ConfigError, match=r"tuner: unknown field\(s\) \['task'\]"):
        config_from_dict({"tuner": {"type": "lora", "task": 1}})

    def run_fails(match, continue_from, task=1, output_dir=None, **options):
        cfg = _task_config(tiny_assets, demo_data, output_dir or tmp_path / "out", task_data[1], task=task,
                           continue_from=continue_from)
        cfg.tuner.options.update(options)
        with pytest.raises(ConfigError, match=match):
            run_instruct(cfg)

    # Checked when the run starts, before any model loads.
    run_fails(r"tuner: task=1 needs the adapter of task 0: set model\.continue_from", None)
    run_fails(r"tuner: task=2 is out of range for num_tasks=2", task0_dir, task=2)
    run_fails(r"tuner: num_tasks=3 differs from the previous adapter's num_tasks=2", task0_dir, num_tasks=3)
    run_fails(r"tuner: num_experts=8 differs", task0_dir, num_experts=8)
    run_fails(r"model\.continue_from=.*not a stage-2 output", stage1_dir)
    run_fails(r"model\.continue_from=.*neither a local folder", str(tmp_path / "missing"))
    run_fails(r"training\.output_dir is the previous run's output", task0_dir, output_dir=task0_dir)
    lora_dir = tmp_path / "lora_output"
    LoraConfig(r=2).save_pretrained(str(lora_dir / "adapter"))
    (lora_dir / "mllm_config.json").write_text("{}")
    run_fails(r"model\.continue_from=.*its adapter is LORA, not delo", str(lora_dir))
