"""Continual missing-modality learning (CMML): a class-incremental classifier over a DeLo-adapted
single-stream backbone, the per-task training loop and the task-by-task result matrix."""

from mllm.continual.cmml import CmmlBatch, DeloClassifier, evaluate_task, run_continual, train_task

__all__ = ["CmmlBatch", "DeloClassifier", "evaluate_task", "run_continual", "train_task"]
