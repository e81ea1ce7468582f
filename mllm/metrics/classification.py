"""Scores of the missing-modality classification benchmarks (MoRA table 1, after MMP / DCP):

* MM-IMDb       - F1-Macro over the 23 genres, a genre predicted when its sigmoid > 0.5 (logit > 0);
* UPMC-Food101  - top-1 accuracy over the 101 classes;
* Hateful Memes - AUROC of softmax(logits)[:, 1] against the binary label.

Written with numpy only; tests check them against scikit-learn (``f1_score(average="macro",
zero_division=0)``, ``accuracy_score``, ``roc_auc_score``). A genre with no positives and no
predictions scores 0 and still counts in the mean, as torchmetrics' multilabel macro F1 does.
"""

from __future__ import annotations

import numpy as np

#: dataset -> (metric name, task kind)
DATASET_METRICS = {"mmimdb": ("f1_macro", "multilabel"), "food101": ("accuracy", "multiclass"),
                   "hateful_memes": ("auroc", "binary")}


def f1_macro(logits, labels) -> float:
    pred = np.asarray(logits) > 0
    true = np.asarray(labels).astype(bool)
    tp = (pred & true).sum(0)
    fp = (pred & ~true).sum(0)
    fn = (~pred & true).sum(0)
    denom = 2 * tp + fp + fn
    per_class = np.where(denom > 0, 2 * tp / np.maximum(denom, 1), 0.0)
    return float(per_class.mean())


def accuracy(logits, labels) -> float:
    return float((np.asarray(logits).argmax(-1) == np.asarray(labels)).mean())


def softmax_positive(logits) -> np.ndarray:
    logits = np.asarray(logits, dtype=np.float64)
    shifted = np.exp(logits - logits.max(-1, keepdims=True))
    return shifted[:, 1] / shifted.sum(-1)


def auroc(scores, labels) -> float:
    """Area under the ROC curve: the Mann-Whitney statistic with tied scores counted half."""
    scores, labels = np.asarray(scores, dtype=np.float64), np.asarray(labels).astype(bool)
    positives, negatives = labels.sum(), (~labels).sum()
    if positives == 0 or negatives == 0:
        raise ValueError("AUROC needs both positive and negative labels")
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores), dtype=np.float64)
    sorted_scores = scores[order]
    start = 0
    while start < len(scores):   # average ranks over ties
        stop = start
        while stop + 1 < len(scores) and sorted_scores[stop + 1] == sorted_scores[start]:
            stop += 1
        ranks[order[start:stop + 1]] = (start + stop) / 2 + 1
        start = stop + 1
    return float((ranks[labels].sum() - positives * (positives + 1) / 2) / (positives * negatives))


def score(dataset: str, logits, labels) -> dict:
    """The dataset's metric from raw logits: ``{"metric": name, "value": float, "n": count}``."""
    try:
        name, _ = DATASET_METRICS[dataset]
    except KeyError:
        raise ValueError(f"unknown dataset {dataset!r}; expected one of {sorted(DATASET_METRICS)}") from None
    if name == "f1_macro":
        value = f1_macro(logits, labels)
    elif name == "accuracy":
        value = accuracy(logits, labels)
    else:
        value = auroc(softmax_positive(logits), labels)
    return {"metric": name, "value": value, "n": int(len(labels))}
