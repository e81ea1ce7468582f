"""``mllm demo --continual``: DeLo against sequential LoRA fine-tuning on a tiny continual
missing-modality sequence (CMML), on a CPU in a few minutes.

1. generate a sequence of tasks in RebQ's CMML file layout, 4 classes each: a shape (image only)
   x one of two attribute words (text only); every task has its own image colours and topic
   words (``mllm.data.synthetic_missing.write_cmml_tasks``);
2. build a tiny random ViLT and its processor, saved locally;
3. run the CMML stage (``mllm.continual.stage.run_cmml``, what ``stages/cmml.py`` runs) with DeLo
   and with the sequential LoRA baseline (one peft LoRA adapter trained task after task, the same
   per-task heads and class-incremental loss), at 0 % and 70 % missing (type ``both``, one saved
   seeded table per task and split);
4. print each result matrix (accuracy on task j after training task i, no task id at test time)
   and the average, forgetting and last accuracy, and write ``results.json``.

The backbone is random (its initialiser range raised to 0.1 so that its frozen features, which
DeLo's routing and Task-Key Memory read, depend on the input); absolute numbers say nothing about
real benchmarks.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import time

METHODS = {"delo": "DeLo", "lora": "sequential LoRA"}
RATIOS = (0.0, 0.7)
SIZES = {"full": dict(num_tasks=3, n_train=128, n_test=64, epochs=12),
         "quick": dict(num_tasks=2, n_train=48, n_test=32, epochs=3)}
JSON_NAME = "SYNTHETIC-CMML.json"


def ratio_label(ratio: float) -> str:
    return f"{ratio:.0%} missing"


def prepare_inputs(out: str, size: str, seed: int) -> dict[str, str]:
    from mllm.continual.tiny import TinyViltSizes, build_tiny_vilt
    from mllm.data.synthetic_missing import cmml_vocabulary, write_cmml_tasks

    sizes = SIZES[size]
    data = write_cmml_tasks(os.path.join(out, "data", size), JSON_NAME, num_tasks=sizes["num_tasks"],
                            n_train=sizes["n_train"], n_test=sizes["n_test"], seed=seed)
    vilt = build_tiny_vilt(os.path.join(out, "assets", f"vilt-{size}-seed{seed}"),
                           cmml_vocabulary(sizes["num_tasks"]), TinyViltSizes(initializer_range=0.1), seed=seed)
    return {"data": data, "vilt": vilt}


def cmml_config(paths: dict, out: str, size: str, method: str, ratio: float, seed: int, overrides=()):
    from mllm.continual.stage import load_cmml_config

    sizes = SIZES[size]
    values = [f"model.backbone={paths['vilt']}", f"tuner.type={method}", "tuner.r=4", "tuner.num_experts=8",
              "data.benchmark=synthetic_cmml", f"data.root={paths['data']}",
              f"data.num_tasks={sizes['num_tasks']}", "data.max_text_len=8",
              f"data.missing={{ratio: {ratio}, type: both, both_ratio: 0.5}}", f"data.seed={seed}",
              f"data.table_dir={os.path.join(out, 'missing_tables', size)}",
              f"training.output_dir={os.path.join(out, 'runs', size, f'{method}-missing{round(100 * ratio)}')}",
              f"training.epochs={sizes['epochs']}", "training.batch_size=16", "training.lr=0.01",
              f"training.seed={seed}"]
    return load_cmml_config(None, values + list(overrides))


def format_matrix(matrix: list[list], title: str) -> str:
    tasks = len(matrix)
    lines = [f"{title:<22}" + "".join(f"{f'task {j}':>8}" for j in range(tasks))]
    for i, row in enumerate(matrix):
        lines.append(f"{f'  after task {i}':<22}" + "".join(f"{'-' if v is None else f'{v:.3f}':>8}" for v in row))
    return "\n".join(lines)


def format_summary(results: dict, ratios=RATIOS) -> str:
    header = f"| {'method':<15} | {'missing':>11} | {'average':>7} | {'forgetting':>10} | {'last':>5} |"
    rule = "|" + "-" * 17 + "|" + "-" * 12 + ":|" + "-" * 8 + ":|" + "-" * 11 + ":|" + "-" * 6 + ":|"
    lines = [header, rule]
    for method, name in METHODS.items():
        for ratio in ratios:
            run = results[method][ratio_label(ratio)]
            lines.append(f"| {name:<15} | {ratio_label(ratio):>11} | {run['average']:>7.3f} | "
                         f"{run['forgetting']:>10.3f} | {run['last']:>5.3f} |")
    return "\n".join(lines)


def run_continual_demo(args: argparse.Namespace) -> dict:
    """Run the demo (``args`` from ``mllm.demo.run.demo_parser``); prints the table, returns the results."""
    from mllm.demo import torch_threads

    with torch_threads(getattr(args, "threads", None)):
        return _run_continual_demo(args)


def _run_continual_demo(args: argparse.Namespace) -> dict:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from mllm.continual.stage import run_cmml

    start = time.time()
    size = "quick" if args.quick else "full"
    out = os.path.abspath(args.output_dir or "mllm-demo-continual")
    print(f"[demo] generating {SIZES[size]['num_tasks']} tasks and a tiny ViLT in {out}", flush=True)
    paths = prepare_inputs(out, size, args.seed)
    results: dict = {method: {} for method in METHODS}
    for ratio in RATIOS:
        for method in METHODS:
            t0 = time.time()
            run = run_cmml(cmml_config(paths, out, size, method, ratio, args.seed, args.overrides))
            results[method][ratio_label(ratio)] = {k: run[k] for k in ("matrix", "average", "forgetting", "last")}
            results[method][ratio_label(ratio)]["seconds"] = time.time() - t0
            print(f"[demo] {METHODS[method]:<15} {ratio_label(ratio):<12} average {run['average']:.3f} "
                  f"forgetting {run['forgetting']:.3f} ({time.time() - t0:.0f}s)", flush=True)
    total = time.time() - start
    for ratio in RATIOS:
        print(f"\nResult matrix, {ratio_label(ratio)}: accuracy on task j's test set after training task i "
              f"(4 new classes per task, scored over every class seen so far, no task id given)")
        for method, name in METHODS.items():
            print(format_matrix(results[method][ratio_label(ratio)]["matrix"], name))
    summary_table = format_summary(results)
    print("\naverage = mean of the last row; forgetting = mean drop from R[j, j] to R[T-1, j] over the earlier "
          "tasks; last = R[T-1, T-1]\n")
    print(summary_table)
    print(f"total {total:.0f}s")
    if not all(math.isfinite(run[k]) for runs in results.values() for run in runs.values()
               for k in ("average", "forgetting", "last")):
        raise RuntimeError("a run produced a non-finite score")
    summary = {"results": results, "table": summary_table, "size": size, "seed": args.seed, "total_seconds": total}
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(summary, f, indent=2)
    return summary
