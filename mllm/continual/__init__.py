"""Continual missing-modality learning (CMML): class-incremental classifiers over a DeLo-adapted
(or, as the baseline, a sequentially LoRA-tuned) single-stream backbone, the per-task training loop
and the task-by-task result matrix."""

from mllm.continual.cmml import (
                                 CmmlBatch,
                                 DeloClassifier,
                                 IncrementalClassifier,
                                 SequentialLoraClassifier,
                                 evaluate_task,
                                 run_continual,
                                 train_task,
)

__all__ = ["CmmlBatch", "DeloClassifier", "IncrementalClassifier", "SequentialLoraClassifier", "evaluate_task",
           "run_continual", "train_task"]
