"""The CMML stage: a DeLo-adapted ViLT trained task by task, scored after each task on every task
seen so far without task ids, written as the result matrix with AP / forgetting / last.

``tuner.type`` picks the method among the tuners registered for ViLT (``mllm.tuners.tuner_names(VILT)``):
``delo`` (default; the other ``tuner`` keys go to ``DeloConfig``) or ``lora``, the sequential
fine-tuning baseline: one peft LoRA adapter of rank ``tuner.r`` and scaling ``tuner.alpha / tuner.r``
(DeLo's scaling rule) on the same projections (ViLT's query / key / value unless
``tuner.target_modules``), trained task after task with the same per-task heads, loss and
class-incremental evaluation. ``num_experts`` is DeLo's only.

    python stages/cmml.py --config configs/cmml/food101_delo.yaml [section.field=value ...]
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from dataclasses import dataclass, field
from typing import Any

import torch

from mllm.checkpoint import MISSING_TABLES_DIR, RESULTS_FILE
from mllm.classify.missing import MissingSpec
from mllm.config import ConfigError, load_sectioned_config
from mllm.continual.cmml import (
    DeloClassifier,
    IncrementalClassifier,
    SequentialLoraClassifier,
    evaluate_task,
    train_task,
)
from mllm.continual.data import CMML_BENCHMARKS, task_loaders
from mllm.metrics.continual import ResultMatrix

logger = logging.getLogger(__name__)


@dataclass
class CmmlModel:
    backbone: str = "dandelin/vilt-b32-mlm"     # HF id or local path (ViltModel + ViltProcessor)


@dataclass
class CmmlData:
    benchmark: str = "food101_cmml"             # food101_cmml | mmimdb_cmml | synthetic_cmml (generated)
    root: str = ""
    num_tasks: int | None = None                # default: the benchmark's (10 / 5)
    max_text_len: int = 40                      # ViLT's text position table has 40 entries
    missing: dict[str, Any] = field(default_factory=lambda: {"ratio": 0.7, "type": "both", "both_ratio": 0.5})
    seed: int = 0
    table_dir: str | None = None                # default: <output_dir>/missing_tables

    def __post_init__(self):
        if self.benchmark not in CMML_BENCHMARKS:
            raise ValueError(f"benchmark must be one of {sorted(CMML_BENCHMARKS)}, got {self.benchmark!r}")


@dataclass
class CmmlTraining:
    output_dir: str = "runs/cmml"
    epochs: int = 10                            # per task (RebQ)
    batch_size: int = 4
    lr: float = 1e-4
    weight_decay: float = 0.0
    align_weight: float = 0.1                   # reference LAMBDA_ALIGN
    head_selection: str = "memory"              # delo: memory (the routed task's head scores) | all
    seed: int = 0


@dataclass
class CmmlConfig:
    model: CmmlModel = field(default_factory=CmmlModel)
    tuner: dict[str, Any] = field(default_factory=lambda: {"r": 4, "num_experts": 16, "alpha": 2.0})
    data: CmmlData = field(default_factory=CmmlData)
    training: CmmlTraining = field(default_factory=CmmlTraining)


def load_cmml_config(path: str | None, overrides: list[str] = ()) -> CmmlConfig:
    """YAML file plus ``section.field=value`` overrides, read by the project's one config loader."""
    return load_sectioned_config(CmmlConfig, path, list(overrides))


#: ``tuner.type`` when the config names none (the CMML presets are DeLo's)
DEFAULT_TUNER = "delo"


def build_classifier(cfg: CmmlConfig, base_model, num_tasks: int, labels_per_task: int,
                     multilabel: bool) -> IncrementalClassifier:
    """The classifier over ``base_model`` (a transformers ViltModel) adapted by the tuner registered for
    ViLT as ``tuner.type``: a tuner that ``partitions_tasks`` (DeLo) gets one part per task and the
    task-partitioned classifier, any other one is trained task after task (sequential fine-tuning)."""
    from mllm.tuners import VILT, tuner_builder, tuner_capability

    options = dict(cfg.tuner)
    tuner_type = options.pop("type", DEFAULT_TUNER)
    build = tuner_builder(tuner_type, VILT)
    if "num_tasks" in options:
        raise ConfigError("tuner.num_tasks: the stage sets it from data.num_tasks (or the benchmark's)")
    if tuner_capability(tuner_type, "partitions_tasks"):
        backbone = build(base_model, {**options, "num_tasks": num_tasks})
        return DeloClassifier(backbone, num_tasks, labels_per_task, multilabel, cfg.training.align_weight,
                              cfg.training.head_selection)
    return SequentialLoraClassifier(build(base_model, options), num_tasks, labels_per_task, multilabel)


def run_cmml(cfg: CmmlConfig) -> dict:
    from transformers import ViltModel, ViltProcessor

    torch.manual_seed(cfg.training.seed)
    _, tasks_total, labels_per_task, multilabel = CMML_BENCHMARKS[cfg.data.benchmark]
    num_tasks = cfg.data.num_tasks or tasks_total
    if not 0 < num_tasks <= tasks_total:
        raise ConfigError(f"data.num_tasks must be in 1..{tasks_total} for {cfg.data.benchmark}, got {num_tasks}")
    processor = ViltProcessor.from_pretrained(cfg.model.backbone)
    model = build_classifier(cfg, ViltModel.from_pretrained(cfg.model.backbone), num_tasks, labels_per_task,
                             multilabel)

    out = cfg.training.output_dir
    table_dir = cfg.data.table_dir or os.path.join(out, MISSING_TABLES_DIR)
    spec = MissingSpec(seed=cfg.data.seed, **cfg.data.missing)
    common = dict(processor=processor, spec=spec, table_dir=table_dir, batch_size=cfg.training.batch_size,
                  max_text_len=cfg.data.max_text_len, seed=cfg.training.seed, num_tasks=num_tasks)
    train = task_loaders(cfg.data.root, cfg.data.benchmark, "train", shuffle=True, **common)
    test = task_loaders(cfg.data.root, cfg.data.benchmark, "test", shuffle=False, **common)

    matrix = ResultMatrix(num_tasks)
    for i in range(num_tasks):
        losses = train_task(model, i, train[i], epochs=cfg.training.epochs, lr=cfg.training.lr,
                            weight_decay=cfg.training.weight_decay)
        for j in range(i + 1):
            matrix.record(i, j, evaluate_task(model, test[j]))
        logger.info("task %d: last loss %.4f, scores %s", i, losses[-1] if losses else float("nan"),
                    matrix.values[i, : i + 1].round(4).tolist())
    os.makedirs(out, exist_ok=True)
    model.save_pretrained(os.path.join(out, "final"))
    results = {"benchmark": cfg.data.benchmark, "tuner": cfg.tuner.get("type", DEFAULT_TUNER),
               "metric": "f1_macro" if multilabel else "accuracy",
               "missing": dataclasses.asdict(spec), **json.loads(matrix.to_json())}
    with open(os.path.join(out, RESULTS_FILE), "w") as f:
        json.dump(results, f, indent=2)
    return results
