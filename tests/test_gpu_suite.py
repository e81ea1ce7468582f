"""benchmarks/gpu_suite.py's plumbing at tiny shapes on the CPU: every step writes its figures and
the table has a row for each (the GPU figures themselves are taken on a GPU, never asserted)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_small_suite_runs_every_step_and_prints_one_table(tmp_path):
    done = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "gpu_suite.py"), "--small", "--work",
                           str(tmp_path), "--time-scale", "3"], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=1800)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = json.load(open(tmp_path / "suite.json"))
    assert set(results) == {"tuners", "stage2", "audio", "generation"}
    assert all(r["status"] == "ok" for r in results.values())
    table = done.stdout.split("measure", 1)[1]
    for row in ("MokA / LoRA train step", "DeLo / LoRA train step", "DeLo / LoRA train step, query cache hit",
                "DeLo / LoRA prompt pass", "stage 2 bf16", "BEATs 10 s clips", "Whisper 30 s clips",
                "batched generation"):
        assert row in table
    train_step = results["tuners"]["figures"]["measures"]["train step"]
    assert train_step["moka_over_lora"] > 0 and train_step["delo_over_lora"] > 0 and \
        train_step["delo_cached_over_lora"] > 0
