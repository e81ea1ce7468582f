"""Both stages as two real processes under `accelerate launch --use_deepspeed` (CPU, gloo, fp32).

Every shipped ZeRO config runs; LoRA, MokA, DeLo and MoRA (pairing the CLIP tower with the LLM);
batches where one rank has no image or no video
at all. A two-process run (2 x batch 2) must save complete projectors and adapters equal to a
single-process run over the same global batches (1 x batch 4), and resuming from a ZeRO
checkpoint must end where the uninterrupted run ended.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
import yaml
from safetensors.torch import load_file

from mllm.config import config_from_dict
from mllm.train.stages import run_instruct, run_pretrain
from tests.conftest import model_section

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
WORLD = 2
MICRO_BATCH = 2
# SGD with momentum: updates scale with the gradients (Adam's first steps barely depend on
# them, so a mis-scaled gradient would pass unnoticed) and the momentum is state to resume.
TRAINING = {"optim": "sgd", "optim_args": "momentum=0.9", "learning_rate": 1.0, "logging_steps": 1, "seed": 0,
            "disable_tqdm": True, "max_steps": 3, "save_steps": 2, "train_sampling_strategy": "sequential",
            "report_to": "none", "use_cpu": True}  # use_cpu as in the demo configs; dropped under DeepSpeed
TUNERS = {
    "lora": {"type": "lora", "r": 4, "alpha": 8, "dropout": 0.0},
    "moka": {"type": "moka", "r": 2, "alpha": 4, "dropout": 0.0,
             "options": {"modalities": ["text", "visual"], "strengths": {"visual": 0.8}}},
    "delo": {"type": "delo", "r": 2, "alpha": 4, "dropout": 0.0, "options": {"num_experts": 4, "num_tasks": 2}},
    # MoRA pairs the CLIP tower's layer with the LLM's last: the encoder trains under ZeRO-3 too.
    "mora": {"type": "mora", "r": 4, "dropout": 0.0,
             "options": {"pair_encoder": "visual", "num_paired_layers": 1, "shared_r": 2}},
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch_env() -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1",
            # DeepSpeed JIT-builds its CPU comm op once (minutes); later runs reuse the build.
            "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR",
                                                   os.path.expanduser("~/.cache/mllm-torch-extensions"))}


def launch_deepspeed(stage: str, config_path: str, ds_config: str, *overrides: str) -> subprocess.CompletedProcess:
    """`accelerate launch --num_processes 2 --use_deepspeed stages/<stage>.py` on the CPU."""
    command = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(WORLD),
               "--num_machines", "1", "--main_process_port", str(_free_port()), "--mixed_precision", "no",
               "--dynamo_backend", "no", "--use_deepspeed",
               "--deepspeed_config_file", os.path.join(ROOT, "deepspeed_configs", ds_config),
               "--zero3_init_flag", "true" if ds_config.startswith("zero3") else "false",
               os.path.join(ROOT, "stages", f"{stage}.py"), "--config", config_path, *overrides]
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=_launch_env(), timeout=900)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    return result


def launch_two_machines(stage: str, config_path: str, *overrides: str) -> None:
    """The shipped multi-node example (configs/accelerate/multi_node_zero3.yaml) as two "machines"
    of one process each on this host: the command the README gives, run once per machine rank."""
    port = str(_free_port())
    machines = []
    for rank in range(2):
        command = [sys.executable, "-m", "accelerate.commands.launch",
                   "--config_file", os.path.join(ROOT, "configs", "accelerate", "multi_node_zero3.yaml"),
                   "--num_processes", "2", "--machine_rank", str(rank),
                   "--main_process_ip", "127.0.0.1", "--main_process_port", port,
                   os.path.join(ROOT, "stages", f"{stage}.py"), "--config", config_path, *overrides]
        machines.append(subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                         cwd=ROOT, env=_launch_env()))
    try:
        outputs = [machine.communicate(timeout=900)[0] for machine in machines]
    finally:
        for machine in machines:
            machine.kill()
    for rank, (machine, output) in enumerate(zip(machines, outputs)):
        assert machine.returncode == 0, f"machine {rank}:\n{output[-4000:]}"


@pytest.fixture(scope="module")
def mixed_train(demo_data, tmp_path_factory) -> str:
    """12 records, 3 global steps of 4: [img img | txt txt], [img vid | img txt], [txt vid | img img].
    Rank 1 sees neither image nor video in step 1; rank 0 no video in step 1 and no text-only
    sample in step 3."""
    records = [json.loads(line) for line in open(demo_data["instruct"])]
    images = [r for r in records if r.get("image")]
    videos = [r for r in records if r.get("video")]
    texts = []
    for r in images[20:24]:
        r = json.loads(json.dumps(r))
        del r["image"]
        r["id"] += "-text"
        r["conversations"][0]["value"] = r["conversations"][0]["value"].replace("<image>\n", "")
        texts.append(r)
    order = [images[0], images[1], texts[0], texts[1],
             images[2], videos[0], images[3], texts[2],
             texts[3], videos[1], images[4], images[5]]
    path = tmp_path_factory.mktemp("mixed") / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in order))
    return str(path)


def _experiment(tiny_assets, demo_data, train, output_dir, stage, tuner="lora", **model_extra) -> dict:
    return {
        "model": model_section(tiny_assets, **model_extra),
        "tuner": TUNERS[tuner] if stage == "instruct" else {"type": "none"},
        "data": {"train": train, "media_root": demo_data["media_root"],
                 "template": "plain" if stage == "pretrain" else "auto"},
        "training": {**TRAINING, "output_dir": str(output_dir)},
    }


def _single_process(experiment: dict, stage: str) -> None:
    """The reference: one process, the whole global batch at once, no DeepSpeed."""
    cfg = config_from_dict(experiment)
    cfg.training.update(per_device_train_batch_size=WORLD * MICRO_BATCH)
    (run_pretrain if stage == "pretrain" else run_instruct)(cfg)


def _multi_process(experiment: dict, stage: str, ds_config: str, tmp_path, *overrides) -> None:
    path = tmp_path / f"{stage}-{ds_config}.yaml"
    path.write_text(yaml.safe_dump(experiment))
    launch_deepspeed(stage, str(path), ds_config, f"training.per_device_train_batch_size={MICRO_BATCH}", *overrides)


def _saved(output_dir) -> dict[str, torch.Tensor]:
    tensors = {f"projectors/{k}": v for k, v in load_file(os.path.join(output_dir, "projectors.safetensors")).items()}
    adapter = os.path.join(output_dir, "adapter", "adapter_model.safetensors")
    if os.path.isfile(adapter):
        tensors.update({f"adapter/{k}": v for k, v in load_file(adapter).items()})
    return tensors


def assert_same_saves(got_dir, want_dir) -> None:
    got, want = _saved(got_dir), _saved(want_dir)
    assert sorted(got) == sorted(want)
    for name, tensor in got.items():
        assert tensor.numel() > 0 and tensor.shape == want[name].shape, f"{name}: {tuple(tensor.shape)}"
        torch.testing.assert_close(tensor, want[name], rtol=1e-4, atol=1e-5, msg=name)


@pytest.fixture(scope="module")
def stage1(tiny_assets, demo_data, tmp_path_factory) -> dict:
    """Stage 1 once in one process and once in two under ZeRO-3 (+ zero3_init)."""
    out = tmp_path_factory.mktemp("ds-stage1")
    experiment = _experiment(tiny_assets, demo_data, demo_data["pretrain"], out / "single", "pretrain")
    _single_process(experiment, "pretrain")
    _multi_process(experiment, "pretrain", "zero3.json", out, f"training.output_dir={out / 'zero3'}")
    return {"single": str(out / "single"), "zero3": str(out / "zero3")}


def _assert_ran_under_deepspeed(output_dir) -> None:
    # The DeepSpeed engine's own checkpoint sits beside ours (use_cpu: true would have turned it off).
    assert os.path.isdir(os.path.join(output_dir, "checkpoint-2", "global_step2"))


def test_stage1_under_zero3_saves_what_one_process_saves(stage1):
    _assert_ran_under_deepspeed(stage1["zero3"])
    assert_same_saves(stage1["zero3"], stage1["single"])


STAGE2_RUNS = [("zero2.json", "lora"), ("zero3.json", "lora"), ("zero2_offload.json", "moka"),
               ("zero3_offload.json", "moka"), ("zero3.json", "delo"), ("zero3.json", "mora")]


@pytest.fixture(scope="module")
def stage2(tiny_assets, demo_data, mixed_train, stage1, tmp_path_factory):
    """Stage-2 runs by (ds_config, tuner), from the same stage-1 projectors; computed on demand."""
    runs: dict = {}

    def run(ds_config: str, tuner: str) -> dict:
        if (ds_config, tuner) not in runs:
            out = tmp_path_factory.mktemp(f"ds-stage2-{tuner}-{ds_config.split('.')[0]}")
            experiment = _experiment(tiny_assets, demo_data, mixed_train, out / "single", "instruct", tuner,
                                     pretrained_projectors=stage1["single"])
            if ("single", tuner) not in runs:
                _single_process(experiment, "instruct")
                runs["single", tuner] = str(out / "single")
            _multi_process(experiment, "instruct", ds_config, out, f"training.output_dir={out / 'multi'}")
            runs[ds_config, tuner] = {"multi": str(out / "multi"), "single": runs["single", tuner],
                                      "experiment": experiment, "root": out}
        return runs[ds_config, tuner]

    return run


@pytest.mark.parametrize("ds_config,tuner", STAGE2_RUNS)
def test_stage2_two_processes_save_what_one_process_saves(stage2, ds_config, tuner):
    run = stage2(ds_config, tuner)
    _assert_ran_under_deepspeed(run["multi"])
    assert_same_saves(run["multi"], run["single"])
    # The step-2 checkpoint too; a complete adapter of the configured tuner.
    assert_same_saves(os.path.join(run["multi"], "checkpoint-2"), os.path.join(run["single"], "checkpoint-2"))
    adapter_config = json.load(open(os.path.join(run["multi"], "adapter", "adapter_config.json")))
    assert adapter_config["peft_type"].lower() == tuner
    # Training moved the adapter far beyond the tolerance (lora_B / moka_B / DeLo's b start at 0;
    # DeLo trains only the current task's pools, task 0).
    b = [t for k, t in _saved(run["multi"]).items() if "_B" in k or (".b_" in k and k.endswith(".0"))]
    assert b and all(bool(t.abs().sum() > 0) for t in b) and max(float(t.abs().max()) for t in b) > 1e-2


@pytest.mark.parametrize("ds_config", ["zero2.json", "zero3.json"])
def test_resume_under_zero_reaches_the_same_weights(stage2, ds_config, tmp_path):
    """Resuming the two-process run from its step-2 ZeRO checkpoint ends where it ended."""
    run = stage2(ds_config, "lora")
    checkpoint = os.path.join(run["multi"], "checkpoint-2")
    _assert_ran_under_deepspeed(run["multi"])
    resumed = tmp_path / "resumed"
    _multi_process(run["experiment"], "instruct", ds_config, tmp_path, f"training.output_dir={resumed}",
                   f"training.resume_from_checkpoint={checkpoint}")
    state = json.load(open(resumed / "checkpoint-3" / "trainer_state.json"))
    assert state["global_step"] == 3
    assert_same_saves(resumed, run["multi"])


def test_stage2_on_two_machines_saves_what_one_process_saves(stage2, tmp_path):
    """Multi-node: two machine ranks meeting at a main address, ZeRO-3, MokA."""
    run = stage2("zero3_offload.json", "moka")  # its single-process reference
    path = tmp_path / "two-machines.yaml"
    path.write_text(yaml.safe_dump(run["experiment"]))
    out = tmp_path / "two-machines"
    launch_two_machines("instruct", str(path), f"training.output_dir={out}",
                        f"training.per_device_train_batch_size={MICRO_BATCH}")
    _assert_ran_under_deepspeed(out)
    assert_same_saves(out, run["single"])
