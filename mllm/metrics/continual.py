"""Continual missing-modality learning (CMML, the RebQ protocol DeLo reports): per-task scores
and the summary numbers of the task-by-task result matrix.

``R[i, j]`` is the score on task j's test set after training task i (entries above the diagonal,
tasks not yet seen, are NaN and never read). With T tasks:

* average performance  AP = mean_j R[T-1, j]            (score on every task at the end)
* forgetting           F  = mean_{j<T-1} (R[j, j] - R[T-1, j])
* last                 L  = R[T-1, T-1]

Scoring is class-incremental, as in RebQ: no task id at test time, the logits are cut to the
classes seen so far (``[:, :(i+1) * labels_per_task]``), so a sample can be confused with an
earlier task's class. UPMC-Food101-CMML: top-1 accuracy; MM-IMDb-CMML: multilabel F1-Macro over
the labels seen so far (the metric functions are the missing-modality suite's).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np

from mllm.metrics.classification import accuracy, f1_macro


def average_performance(matrix) -> float:
    R = np.asarray(matrix, dtype=float)
    return float(R[-1].mean())


def forgetting(matrix) -> float:
    """Mean drop from the score right after learning a task to the final score; 0 for one task."""
    R = np.asarray(matrix, dtype=float)
    T = R.shape[0]
    if T < 2:
        return 0.0
    return float(np.mean([R[j, j] - R[T - 1, j] for j in range(T - 1)]))


def last(matrix) -> float:
    R = np.asarray(matrix, dtype=float)
    return float(R[-1, -1])


def summarize(matrix) -> dict:
    R = np.asarray(matrix, dtype=float)
    if R.ndim != 2 or R.shape[0] != R.shape[1]:
        raise ValueError(f"the result matrix must be square (tasks x tasks), got shape {R.shape}")
    if np.isnan(np.tril(R)).any():
        raise ValueError("the result matrix has NaN on or below the diagonal (a task was not evaluated)")
    return {"average": average_performance(R), "forgetting": forgetting(R), "last": last(R),
            # AP after each step: mean over the tasks seen so far (the curve papers plot)
            "average_per_step": [float(R[i, : i + 1].mean()) for i in range(R.shape[0])]}


def score_task(logits, labels, seen_classes: int, multilabel: bool) -> float:
    """Score one task's test set with the logits of every class seen so far (class-incremental)."""
    logits = np.asarray(logits)[:, :seen_classes]
    labels = np.asarray(labels)
    if multilabel:
        return f1_macro(logits, labels[:, :seen_classes])
    return accuracy(logits, labels)


@dataclass
class ResultMatrix:
    """Filled row by row during a continual run: ``record(i, j, score)`` after training task i."""

    num_tasks: int
    values: np.ndarray = field(init=False)

    def __post_init__(self):
        self.values = np.full((self.num_tasks, self.num_tasks), np.nan)

    def record(self, trained: int, evaluated: int, score: float) -> None:
        if evaluated > trained:
            raise ValueError(f"task {evaluated} is evaluated before it is trained (after task {trained})")
        self.values[trained, evaluated] = score

    def summary(self) -> dict:
        return summarize(self.values)

    def to_json(self) -> str:
        rows = [[None if np.isnan(v) else float(v) for v in row] for row in self.values]
        return json.dumps({"matrix": rows, **self.summary()}, indent=2)
