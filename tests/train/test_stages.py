"""Stage 1 and stage 2 through the HF Trainer on tiny real models."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from mllm.config import config_from_dict
from mllm.data.media import MediaError
from mllm.model import MultimodalLM
from mllm.train.stages import run_instruct, run_pretrain
from tests.conftest import model_section

TRAINING = {"per_device_train_batch_size": 8, "learning_rate": 1e-2, "logging_steps": 1, "save_steps": 1000,
            "seed": 0, "use_cpu": True, "disable_tqdm": True, "train_sampling_strategy": "sequential"}


def _config(tiny_assets, demo_data, output_dir, stage, **training):
    data = {"train": demo_data["pretrain" if stage == "pretrain" else "instruct"],
            "media_root": demo_data["media_root"], "template": "plain" if stage == "pretrain" else "auto"}
    model = model_section(tiny_assets)
    if stage == "instruct":
        model["pretrained_projectors"] = training.pop("pretrained_projectors", None)
    return config_from_dict({
        "model": model, "data": data,
        "tuner": {"type": "none" if stage == "pretrain" else "lora", "r": 4, "alpha": 8},
        "training": {**TRAINING, "output_dir": str(output_dir), "max_steps": 3, **training},
    })


def _snapshot(module):
    return {n: p.detach().clone() for n, p in module.state_dict().items()}


def assert_same_trained_weights(got: MultimodalLM, want: MultimodalLM) -> None:
    """Every trainable parameter equal (float tolerance); there must be some."""
    trained = [(name, a, b) for (name, a), (_, b) in zip(got.named_parameters(), want.named_parameters())
               if b.requires_grad]
    assert trained
    for name, a, b in trained:
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


@pytest.fixture(scope="module")
def stage1_dir(tiny_assets, demo_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("stage1")
    run_pretrain(_config(tiny_assets, demo_data, out, "pretrain"))
    return str(out)


def test_stage1_changes_only_projector_weights(tiny_assets, demo_data, tmp_path):
    cfg = _config(tiny_assets, demo_data, tmp_path, "pretrain")
    model = MultimodalLM.from_config(cfg.model)
    before = {"llm": _snapshot(model.llm), "encoders": _snapshot(model.encoders),
              "projectors": _snapshot(model.projectors)}
    run_pretrain(cfg, model)
    for part in ("llm", "encoders"):
        after = getattr(model, part).state_dict()
        assert all(torch.equal(before[part][n], after[n]) for n in after), f"{part} changed in stage 1"
    changed = [n for n, p in model.projectors.state_dict().items() if not torch.equal(p, before["projectors"][n])]
    assert len(changed) > 0.8 * len(before["projectors"])
    # The output folder holds projectors (+ config, tokenizer), never LLM weights.
    files = set(os.listdir(tmp_path))
    assert {"projectors.safetensors", "projectors.json", "mllm_config.json"} <= files
    assert not any(f.startswith("model") and f.endswith(".safetensors") for f in files)
    saved = load_file(os.path.join(tmp_path, "projectors.safetensors"))
    assert all(torch.equal(saved[f"{n}"], p) for n, p in model.projectors.state_dict().items())


def test_stage2_starts_from_stage1_projectors_and_trains_the_tuner(tiny_assets, demo_data, stage1_dir, tmp_path):
    cfg = _config(tiny_assets, demo_data, tmp_path, "instruct", pretrained_projectors=stage1_dir,
                  projector_lr=1e-3)
    model = MultimodalLM.from_config(cfg.model)
    stage1 = load_file(os.path.join(stage1_dir, "projectors.safetensors"))
    assert all(torch.equal(stage1[n], p) for n, p in model.projectors.state_dict().items())
    base = _snapshot(model.llm)
    run_instruct(cfg, model)
    # Projectors moved on from stage 1; LoRA weights trained; base weights untouched.
    assert any(not torch.equal(stage1[n], p) for n, p in model.projectors.state_dict().items())
    trained = {n: p for n, p in model.llm.named_parameters() if p.requires_grad}
    assert trained and all("lora_" in n for n in trained)
    assert any(bool(p.abs().sum() > 0) for n, p in trained.items() if "lora_B" in n)
    for name, value in model.base_llm.state_dict().items():
        original = base.get(name.replace("base_layer.", ""))
        if "lora_" not in name and original is not None:
            assert torch.equal(value, original), name
    assert os.path.isfile(os.path.join(tmp_path, "adapter", "adapter_model.safetensors"))
    # Separate learning rates: the projector groups run at projector_lr.
    assert {g["lr"] for g in _optimizer_groups(model, cfg)} == {1e-2, 1e-3}


def _optimizer_groups(model, cfg):
    from mllm.train.stages import training_arguments
    from mllm.train.trainer import MultimodalTrainer

    args = training_arguments(cfg)
    args.learning_rate = 1e-2
    trainer = MultimodalTrainer(model=model, args=args)
    return trainer.create_optimizer().param_groups


def generate_token_ids(model, eval_path, media_root):
    """Greedy new-token ids for every eval prompt, in left-padded batches of 4."""
    from torch.utils.data import DataLoader

    from mllm.data.dataset import MultimodalCollator, MultimodalDataset

    model.eval()
    dataset = MultimodalDataset(eval_path, model.tokenizer, model.media_specs(), media_root=media_root,
                                for_generation=True, progress=False)
    loader = DataLoader(dataset, batch_size=4, collate_fn=MultimodalCollator(model.tokenizer.pad_token_id, "left"))
    ids = []
    for batch in loader:
        ids += model.generate(**batch, max_new_tokens=6, do_sample=False).tolist()
    return ids


GENERATE_SCRIPT = """
import json, sys
from mllm.model import MultimodalLM
from tests.train.test_stages import generate_token_ids
print(json.dumps(generate_token_ids(MultimodalLM.from_pretrained(sys.argv[1]), sys.argv[2], sys.argv[3])))
"""


def test_save_reload_in_a_fresh_process_generates_identically(tiny_assets, demo_data, stage1_dir, tmp_path):
    cfg = _config(tiny_assets, demo_data, tmp_path, "instruct", pretrained_projectors=stage1_dir)
    model = run_instruct(cfg)
    live = generate_token_ids(model, demo_data["eval"], demo_data["media_root"])
    repo_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    out = subprocess.run([sys.executable, "-c", GENERATE_SCRIPT, str(tmp_path), demo_data["eval"],
                          demo_data["media_root"]], capture_output=True, text=True, check=True, cwd=repo_root,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"})
    reloaded = json.loads(out.stdout.strip().splitlines()[-1])
    assert len(live) == 16 and all(len(row) == 6 for row in live)
    assert reloaded == live


def test_run_stopped_by_a_corrupt_image_keeps_the_last_checkpoint(tiny_assets, demo_data, tmp_path):
    """A corrupt image discovered mid-run stops it with an error naming file and record; the
    checkpoint written before it still loads and resumes."""
    records = [json.loads(line) for line in open(demo_data["instruct"])][:6]
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 20)
    records[4]["image"] = str(broken)
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in records))
    out = tmp_path / "run"
    cfg = _config(tiny_assets, demo_data, out, "instruct", per_device_train_batch_size=2, save_steps=1)
    cfg.data.train = str(train)
    with pytest.raises(MediaError, match=rf"record '{records[4]['id']}'.*broken\.png"):
        run_instruct(cfg)
    # accelerate reads one batch ahead, so the error surfaces while step 2 runs.
    from transformers.trainer_utils import get_last_checkpoint

    checkpoint = get_last_checkpoint(str(out))
    assert checkpoint is not None and checkpoint.endswith("checkpoint-1")
    reloaded = MultimodalLM.from_pretrained(checkpoint)
    assert reloaded.llm.peft_config  # adapter present
    # Resuming with skip mode finishes the run from that checkpoint.
    cfg.data.on_bad_sample = "skip"
    cfg.training["resume_from_checkpoint"] = checkpoint
    run_instruct(cfg)
    state = json.loads((out / "checkpoint-3" / "trainer_state.json").read_text())
    assert state["global_step"] == 3


def test_resume_reaches_the_same_weights(tiny_assets, demo_data, stage1_dir, tmp_path):
    """A run resumed from its step-2 checkpoint ends where the uninterrupted run ended."""
    cfg = _config(tiny_assets, demo_data, tmp_path, "instruct", pretrained_projectors=stage1_dir,
                  max_steps=4, save_steps=2)
    straight = run_instruct(cfg)
    cfg.training["resume_from_checkpoint"] = str(tmp_path / "checkpoint-2")
    resumed = run_instruct(cfg)
    assert_same_trained_weights(resumed, straight)


class _KilledAfterCheckpoint(Exception):
    pass


@pytest.mark.parametrize("stage", ["pretrain", "instruct"])
def test_run_killed_after_a_checkpoint_resumes_to_the_same_weights(tiny_assets, demo_data, stage1_dir, tmp_path,
                                                                   monkeypatch, stage):
    """A run dies right after writing checkpoint-2; `resume_from_checkpoint: true` picks that
    checkpoint up and ends with the weights of a run that never stopped. Random data order and
    dropout, so the data position and the RNG states must be restored too."""
    from transformers import TrainerCallback

    import mllm.train.stages as stages

    run = {"pretrain": run_pretrain, "instruct": run_instruct}[stage]
    extra = {"pretrained_projectors": stage1_dir} if stage == "instruct" else {}

    def config(output_dir):
        cfg = _config(tiny_assets, demo_data, output_dir, stage, max_steps=4, save_steps=2,
                      train_sampling_strategy="random", **extra)
        cfg.tuner.dropout = 0.2
        for projector in cfg.model.projectors.values():
            projector.dropout = 0.2
        return cfg

    straight = run(config(tmp_path / "straight"))

    class Kill(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            if state.global_step == 2:
                raise _KilledAfterCheckpoint

    class DyingTrainer(stages.MultimodalTrainer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, callbacks=[Kill()], **kwargs)

    interrupted = config(tmp_path / "interrupted")
    with monkeypatch.context() as patch:
        patch.setattr(stages, "MultimodalTrainer", DyingTrainer)
        with pytest.raises(_KilledAfterCheckpoint):
            run(interrupted)
    assert sorted(os.listdir(tmp_path / "interrupted")) == ["checkpoint-2", "run_fingerprint.json"]
    steps_taken = []

    class Count(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            steps_taken.append(state.global_step)

    class CountingTrainer(stages.MultimodalTrainer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, callbacks=[Count()], **kwargs)

    interrupted.training["resume_from_checkpoint"] = True   # the newest checkpoint in output_dir
    with monkeypatch.context() as patch:
        patch.setattr(stages, "MultimodalTrainer", CountingTrainer)
        resumed = run(interrupted)
    assert steps_taken == [3, 4]   # it went on from checkpoint-2 rather than starting again
    assert_same_trained_weights(resumed, straight)


def test_stage2_with_gradient_checkpointing_trains_as_without(tiny_assets, demo_data, stage1_dir, tmp_path):
    """``training.gradient_checkpointing`` goes through the Trainer's call (transformers' signature,
    with ``every_n_layers``) and recomputes activations without changing what is learned."""
    models = []
    for checkpointing in (False, True):
        cfg = _config(tiny_assets, demo_data, tmp_path / str(checkpointing), "instruct",
                      pretrained_projectors=stage1_dir, gradient_checkpointing=checkpointing)
        model = MultimodalLM.from_config(cfg.model)
        run_instruct(cfg, model)
        assert model.base_llm.is_gradient_checkpointing == checkpointing
        models.append(model)
    assert_same_trained_weights(models[1], models[0])
