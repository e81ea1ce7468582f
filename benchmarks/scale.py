"""Stage-1 feature-cache speed-up and two-process ZeRO-2 step time, measured in one run.

1. Feature cache: stage 1 trains for one epoch twice over the same generated captions with
   ``model.feature_cache`` set. The first epoch encodes every image (and stores the features);
   the second reads them back. Printed: seconds per epoch and uncached / cached.
2. ZeRO-2: stage 2 for ``--steps`` steps as one process (no DeepSpeed) and as two processes under
   ``accelerate launch --use_deepspeed`` with ``deepspeed_configs/zero2.json``, each process with
   the same per-device batch. Printed: seconds per optimizer step from the Trainer's own
   ``train_runtime`` (model loading and DeepSpeed start-up excluded), the ratio two-process /
   one-process, and the samples-per-second ratio (the two-process step holds twice the samples).

On a CPU both processes share the machine's cores (``OMP_NUM_THREADS`` is split between them), so
the ZeRO-2 ratio there measures the cost of DeepSpeed's communication and partitioning, not a
speed-up; on a multi-GPU machine each process has its own GPU.

    python benchmarks/scale.py                        # both, tiny CLIP-224 + tiny LLaMA, CPU
    python benchmarks/scale.py --skip-zero2 --images 512
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time

import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

PROJECTOR = {"num_queries": 8, "hidden_size": 64, "num_layers": 2, "num_heads": 4, "intermediate_size": 128,
             "dropout": 0.0}
TRAINING = {"per_device_train_batch_size": 16, "learning_rate": 1e-3, "use_cpu": True, "disable_tqdm": True,
            "save_strategy": "no", "report_to": "none", "seed": 0, "logging_steps": 1000,
            "dataloader_num_workers": 0}


def build_inputs(work: str, images: int, image_size: int) -> dict:
    """Generated captions and QA pairs, a tiny LLaMA and a CLIP tower at the given image size."""
    from mllm.data.synthetic import write_demo_dataset
    from mllm.demo.assets import TinySizes, build_tiny_assets

    data = write_demo_dataset(os.path.join(work, "data"), seed=0, image_size=image_size, num_pretrain=images,
                              num_instruct=images, num_eval=8)
    corpus = [t["value"] for path in (data["pretrain"], data["instruct"])
              for line in open(path) for t in json.loads(line)["conversations"]]
    # A ViT-S/14-sized tower (12 layers, width 384) beside a 2-layer LM: the encoder's share of a
    # step is then closer to that of CLIP ViT-L/14 beside a 7B LM than a toy tower's would be.
    sizes = TinySizes(image_size=image_size, patch_size=14, vision_hidden=384, vision_layers=12, llm_hidden=128)
    assets = build_tiny_assets(os.path.join(work, "assets"), corpus, sizes=sizes)
    return {"data": data, "assets": assets}


def experiment(inputs: dict, output_dir: str, stage: str, **model_extra) -> dict:
    data, assets = inputs["data"], inputs["assets"]
    return {
        "model": {"llm": assets["llm"], "encoders": {"visual": {"type": "clip", "path": assets["clip"]}},
                  "projectors": {"visual": dict(PROJECTOR)}, **model_extra},
        "tuner": {"type": "lora", "r": 8, "alpha": 16, "dropout": 0.0} if stage == "instruct" else {"type": "none"},
        "data": {"train": data[stage], "media_root": data["media_root"],
                 "template": "plain" if stage == "pretrain" else "auto"},
        "training": {**TRAINING, "output_dir": output_dir},
    }


def feature_cache_epochs(inputs: dict, work: str) -> tuple[float, float]:
    """Seconds for stage 1's first (encoding) and second (cached) epoch."""
    from mllm.config import config_from_dict
    from mllm.train.stages import run_pretrain

    cache = os.path.join(work, "feature-cache")
    seconds = []
    for run in ("uncached", "cached"):
        cfg = config_from_dict(experiment(inputs, os.path.join(work, f"stage1-{run}"), "pretrain",
                                          feature_cache=cache))
        cfg.training["num_train_epochs"] = 1
        start = time.perf_counter()
        run_pretrain(cfg)
        seconds.append(time.perf_counter() - start)
    return seconds[0], seconds[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launched_step_seconds(inputs: dict, work: str, name: str, processes: int, steps: int, threads: int) -> dict:
    """Run stage 2 under ``accelerate launch``; seconds per step from the Trainer's train_runtime."""
    output_dir = os.path.join(work, name)
    exp = experiment(inputs, output_dir, "instruct")
    exp["training"]["max_steps"] = steps
    config = os.path.join(work, f"{name}.yaml")
    with open(config, "w") as f:
        yaml.safe_dump(exp, f)
    command = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(processes),
               "--num_machines", "1", "--main_process_port", str(_free_port()), "--mixed_precision", "no",
               "--dynamo_backend", "no"]
    if processes > 1:
        command += ["--use_deepspeed", "--deepspeed_config_file", os.path.join(ROOT, "deepspeed_configs", "zero2.json"),
                    "--zero3_init_flag", "false"]
    else:
        command += ["--cpu"] if not _cuda() else []
    command += [os.path.join(ROOT, "stages", "instruct.py"), "--config", config]
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1",
           "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR",
                                                  os.path.expanduser("~/.cache/mllm-torch-extensions"))}
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=env)
    if result.returncode != 0:
        raise SystemExit(f"{name} failed:\n{(result.stdout + result.stderr)[-4000:]}")
    state = json.load(open(os.path.join(output_dir, "trainer_state.json")))
    summary = next(entry for entry in reversed(state["log_history"]) if "train_runtime" in entry)
    return {"step": summary["train_runtime"] / state["global_step"],
            "samples_per_second": summary["train_samples_per_second"]}


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=256, help="stage-1 captions (one image each)")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--steps", type=int, default=12, help="stage-2 optimizer steps per ZeRO-2 comparison run")
    parser.add_argument("--skip-cache", action="store_true")
    parser.add_argument("--skip-zero2", action="store_true")
    parser.add_argument("--work-dir", default=None, help="keep inputs and runs here (default: a temp folder)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        work = args.work_dir or tmp
        inputs = build_inputs(work, args.images, args.image_size)
        if not args.skip_cache:
            uncached, cached = feature_cache_epochs(inputs, work)
            print(f"stage-1 epoch over {args.images} images at {args.image_size} px: "
                  f"uncached {uncached:.2f} s, cached {cached:.2f} s, speed-up {uncached / cached:.2f}x")
        if not args.skip_zero2:
            cores = os.cpu_count() or 1
            one = launched_step_seconds(inputs, work, "one-process", 1, args.steps, cores)
            two = launched_step_seconds(inputs, work, "zero2-two-process", 2, args.steps, max(1, cores // 2))
            print(f"stage-2 step, batch {TRAINING['per_device_train_batch_size']} per process: one process "
                  f"{one['step']:.3f} s, two-process ZeRO-2 {two['step']:.3f} s, "
                  f"step-time ratio {two['step'] / one['step']:.2f}, "
                  f"samples/s ratio {two['samples_per_second'] / one['samples_per_second']:.2f}")


if __name__ == "__main__":
    main()
