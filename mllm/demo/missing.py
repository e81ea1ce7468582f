"""``mllm demo --missing-modality``: MoRA against peft LoRA and a frozen backbone on a tiny
missing-modality classification task, at 0 % and 70 % missing, on a CPU in a few minutes.

1. generate UPMC-Food101-format data whose 4 classes pair a shape (drawn in the image only) with
   a taste word (in the title only), so a class needs both modalities
   (``mllm.data.synthetic_missing.write_food101_pairs``);
2. build a tiny random CLIP dual encoder (vision width 64, text width 48: different widths, as in
   the paper) and a word-level tokenizer, saved locally;
3. run the classification stage (``mllm.classify.train.run_classify``, what ``stages/classify.py``
   runs) once per tuner and missing ratio: MoRA and LoRA in the last two layers of both towers
   (q and v projections, rank 4, the same strength 2), and the frozen backbone (head only).
   Missing modalities as MMP / the paper: type ``both`` (half of the missing samples lose the
   image, half the text), the same ratio in train, val and test, one saved seeded table per split
   shared by all tuners;
4. print the test accuracy table (tuner x missing ratio) and write ``results.json``.

The backbone is random, not a pretrained CLIP: the frozen baseline's features separate the taste
words but hardly the shapes, so it stays near the text-only ceiling, while the tuners learn the
shapes in the adapted layers. Absolute numbers say nothing about real benchmarks.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import time

TUNERS = ("mora", "lora", "frozen")
RATIOS = (0.0, 0.7)
TUNER_OPTIONS = {
    "mora": {"r": 4, "shared_r": 4, "alpha": 2.0, "dropout": 0.0, "num_paired_layers": 2,
             "target_modules": ["q_proj", "v_proj"]},
    "lora": {"r": 4, "lora_alpha": 8, "dropout": 0.0, "num_paired_layers": 2, "target_modules": ["q_proj", "v_proj"]},
    "frozen": {},
}
SIZES = {"full": dict(n_train=480, n_val=120, n_test=240, epochs=10, batch_size=32),
         "quick": dict(n_train=192, n_val=64, n_test=128, epochs=6, batch_size=16)}


def ratio_label(ratio: float) -> str:
    return f"{ratio:.0%} missing"


def prepare_inputs(out: str, size: str, seed: int) -> dict[str, str]:
    """Generated data and the tiny CLIP (with its tokenizer), regenerated identically each run."""
    from mllm.classify.tiny import build_tiny_clip
    from mllm.data.synthetic_missing import pair_vocabulary, write_food101_pairs, write_word_tokenizer

    sizes = SIZES[size]
    data = write_food101_pairs(os.path.join(out, "data", size), n_train=sizes["n_train"], n_val=sizes["n_val"],
                               n_test=sizes["n_test"], seed=seed)
    tokenizer = write_word_tokenizer(os.path.join(out, "assets", "tokenizer"), pair_vocabulary())
    clip = build_tiny_clip(os.path.join(out, "assets", f"clip-seed{seed}"), tokenizer, seed=seed)
    return {"data": data, "clip": clip}


def classify_config(paths: dict, out: str, size: str, tuner: str, ratio: float, seed: int, overrides=()):
    from mllm.classify.train import load_classify_config
    from mllm.data.synthetic_missing import pair_classes

    values = [f"model.backbone={paths['clip']}", f"tuner.type={tuner}", "data.dataset=food101",
              f"data.root={paths['data']}", f"data.num_classes={len(pair_classes())}", "data.max_text_len=8",
              "data.image_fill=white", "data.cache_images=true", f"data.seed={seed}",
              f"data.table_dir={os.path.join(out, 'missing_tables', size)}",
              *[f"data.{split}_missing={{ratio: {ratio}, type: both, both_ratio: 0.5}}"
                for split in ("train", "val", "test")],
              f"training.output_dir={os.path.join(out, 'runs', size, f'{tuner}-missing{round(100 * ratio)}')}",
              f"training.epochs={SIZES[size]['epochs']}", f"training.batch_size={SIZES[size]['batch_size']}",
              "training.lr=0.03", "training.weight_decay=0.02", "training.warmup_ratio=0.1", "training.patience=100",
              f"training.seed={seed}"]
    cfg = load_classify_config(None, values + list(overrides))
    cfg.tuner.options = {**TUNER_OPTIONS[tuner], **cfg.tuner.options}
    return cfg


def format_table(results: dict, ratios=RATIOS, tuners=TUNERS) -> str:
    """Markdown table: one row per tuner, its trainable parameters and the test metric per ratio."""
    columns = [ratio_label(r) for r in ratios]
    header = f"| {'tuner':<7} | {'trainable':>9} | " + " | ".join(f"{c:>11}" for c in columns) + " |"
    rule = "|" + "-" * 9 + "|" + "-" * 10 + ":|" + "|".join("-" * 12 + ":" for _ in columns) + "|"
    lines = [header, rule]
    for tuner in tuners:
        runs = [results[tuner][ratio_label(r)] for r in ratios]
        lines.append(f"| {tuner:<7} | {runs[0]['trainable_params']:>9,} | " +
                     " | ".join(f"{run['test']:>11.3f}" for run in runs) + " |")
    return "\n".join(lines)


def run_missing_demo(args: argparse.Namespace) -> dict:
    """Run the demo (``args`` from ``mllm.demo.run.demo_parser``); prints the table, returns the results."""
    from mllm.demo import torch_threads

    with torch_threads(getattr(args, "threads", None)):
        return _run_missing_demo(args)


def _run_missing_demo(args: argparse.Namespace) -> dict:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from mllm.classify.train import run_classify
    from mllm.data.synthetic_missing import pair_classes

    start = time.time()
    size = "quick" if args.quick else "full"
    out = os.path.abspath(args.output_dir or "mllm-demo-missing")
    print(f"[demo] generating data and a tiny CLIP in {out}", flush=True)
    paths = prepare_inputs(out, size, args.seed)
    results: dict = {tuner: {} for tuner in TUNERS}
    for ratio in RATIOS:
        for tuner in TUNERS:
            t0 = time.time()
            run = run_classify(classify_config(paths, out, size, tuner, ratio, args.seed, args.overrides))
            value = run["test"]["value"]
            results[tuner][ratio_label(ratio)] = {"test": value, "val_best": run["val_best"],
                                                  "trainable_params": run["trainable_params"],
                                                  "n_test": run["test"]["n"], "seconds": time.time() - t0}
            print(f"[demo] {tuner:<6} {ratio_label(ratio):<12} test accuracy {value:.3f} "
                  f"({time.time() - t0:.0f}s)", flush=True)
    total = time.time() - start
    n_test = results[TUNERS[0]][ratio_label(RATIOS[0])]["n_test"]
    classes = pair_classes()
    table = format_table(results)
    ceilings = ", ".join(f"{ratio_label(r)} {1 - r / 2:.2f}" for r in RATIOS)
    print(f"\nTest accuracy, {len(classes)} classes ({', '.join(classes)}; chance {1 / len(classes):.2f}), "
          f"{n_test} test samples; missing type both, the same ratio in train, val and test:\n")
    print(table)
    print(f"\nWith one modality missing only half of the classes can be told apart, so the best possible "
          f"accuracy is {ceilings}.")
    print(f"total {total:.0f}s")
    summary = {"results": results, "table": table, "classes": classes, "size": size, "seed": args.seed,
               "total_seconds": total}
    if not all(math.isfinite(v["test"]) for runs in results.values() for v in runs.values()):
        raise RuntimeError("a run produced a non-finite score")
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(summary, f, indent=2)
    return summary
