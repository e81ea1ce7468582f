"""Class-incremental CMML with DeLo (figure 2, left panel; RebQ's protocol), and the sequential
LoRA fine-tuning baseline.

``DeloClassifier`` = a DeLo-adapted ViLT-style backbone (``PeftModel``) + one linear head per task
over the backbone's pooled output. After training task t the model scores the classes of tasks
0..t (logits concatenated in task order); at test time it is given no task id: the Task-Key Memory
picks each sample's pools, and the argmax runs over every class seen so far.

Task partitioning covers the heads too: ``set_task(t)`` leaves only head t and task t's pools,
routers and query maps trainable. Figure 2 pairs each task's experts with its own classifier, and
the Task-Key Memory makes inference task-agnostic; so by default (``head_selection="memory"``) a
test sample is scored by the head of the task the memory routed it to (the other tasks' logits are
masked), the argmax still running over every class seen so far. ``head_selection="all"`` lets
every seen head compete (RebQ's prompt-based models have no task choice to reuse); with per-task
heads trained under ``FREEZE_LOGITS`` an earlier head's confident logits then often win on a new
task's samples. Training follows RebQ where the DeLo paper is silent: previous
tasks' logits are set to -100 in the cross-entropy (``FREEZE_LOGITS``), a fresh AdamW per task;
the loss adds ``align_weight`` x the q_v / q_t alignment loss (reference ``LAMBDA_ALIGN`` 0.1). The
reference's extra KL consistency term is not in the paper's figures and is left out. Multilabel
(MM-IMDb-CMML): BCE on the current task's label columns only.

``SequentialLoraClassifier`` is the lower bound the DeLo paper compares against: the same heads,
loss and class-incremental evaluation, but one peft LoRA adapter trained task after task.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from mllm.checkpoint import CMML_HEADS_FILE, CMML_META_FILE
from mllm.continual.vilt_ids import publish_vilt_modality_ids
from mllm.metrics.continual import ResultMatrix, score_task

#: logit given at eval to the classes of tasks other than the one a sample was routed to
MASKED_LOGIT = -1e4


@dataclass
class CmmlBatch:
    inputs: dict                     # backbone kwargs (input_ids, attention_mask, pixel_values, ...)
    labels: torch.Tensor             # (B,) global class ids, or (B, classes) multi-hot
    missing: Optional[torch.Tensor] = None   # (B,) codes 0 complete / 1 text / 2 image missing


class IncrementalClassifier(nn.Module):
    """A peft-adapted backbone + one linear head per task over its pooled output; after training
    task t the logits of tasks 0..t are concatenated in task order (class-incremental). Subclasses
    say which backbone parameters train for a task and add their own loss terms."""

    #: written into ``CMML_META_FILE`` so a checkpoint says which classifier it is
    kind = "base"

    def __init__(self, backbone: nn.Module, num_tasks: int, labels_per_task: int, multilabel: bool = False):
        super().__init__()
        self.backbone = backbone
        hidden = backbone.get_base_model().config.hidden_size
        self.heads = nn.ModuleList([nn.Linear(hidden, labels_per_task) for _ in range(num_tasks)])
        self.num_tasks, self.labels_per_task, self.multilabel = num_tasks, labels_per_task, multilabel
        self.task = 0

    def set_task(self, task: int) -> None:
        if not 0 <= task < self.num_tasks:
            raise ValueError(f"task {task} out of range for {self.num_tasks} tasks")
        self.task = task
        for t, head in enumerate(self.heads):
            head.requires_grad_(t == task)

    @property
    def seen_classes(self) -> int:
        return (self.task + 1) * self.labels_per_task

    def features(self, inputs: dict, missing: Optional[torch.Tensor], task_ids: Optional[torch.Tensor]):
        return self.backbone(**inputs).pooler_output

    def forward(self, inputs: dict, missing: Optional[torch.Tensor] = None,
                task_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Logits over every class seen so far."""
        features = self.features(inputs, missing, task_ids)
        return torch.cat([head(features) for head in self.heads[: self.task + 1]], dim=-1)

    def extra_loss(self) -> torch.Tensor | float:
        return 0.0

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        start = self.task * self.labels_per_task
        if self.multilabel:
            current = slice(start, start + self.labels_per_task)
            task_loss = F.binary_cross_entropy_with_logits(logits[:, current], labels[:, current].float())
        else:
            frozen = torch.zeros_like(logits, dtype=torch.bool)
            frozen[:, :start] = True
            task_loss = F.cross_entropy(logits.masked_fill(frozen, -100.0), labels)
        return task_loss + self.extra_loss()

    # -- checkpoint: the peft adapter + the heads ---------------------------------------------------------
    def _meta(self) -> dict:
        return {"num_tasks": self.num_tasks, "labels_per_task": self.labels_per_task, "multilabel": self.multilabel}

    def save_pretrained(self, path: str) -> None:
        from safetensors.torch import save_file

        self.backbone.save_pretrained(path)
        save_file({k: v.contiguous() for k, v in self.heads.state_dict().items()}, os.path.join(path, CMML_HEADS_FILE))
        with open(os.path.join(path, CMML_META_FILE), "w") as f:
            json.dump({**self._meta(), "task": self.task, "kind": self.kind}, f)

    @classmethod
    def from_pretrained(cls, base_model: nn.Module, path: str):
        from peft import PeftModel
        from safetensors.torch import load_file

        with open(os.path.join(path, CMML_META_FILE)) as f:
            meta = json.load(f)
        task = meta.pop("task")
        kind = meta.pop("kind", DeloClassifier.kind)
        if kind != cls.kind:
            raise ValueError(f"{path} holds a {kind!r} classifier, not {cls.kind!r}")
        model = cls(PeftModel.from_pretrained(base_model, path), **meta)
        model.heads.load_state_dict(load_file(os.path.join(path, CMML_HEADS_FILE)))
        model.set_task(task)
        return model.eval()


class DeloClassifier(IncrementalClassifier):
    """DeLo: task partitioning covers the heads and the backbone: ``set_task(t)`` leaves only head
    t and task t's pools, routers and query maps trainable. At test time the Task-Key Memory picks
    each sample's pools (``task_ids`` None)."""

    kind = "delo"
    HEAD_SELECTION = ("memory", "all")

    def __init__(self, backbone: nn.Module, num_tasks: int, labels_per_task: int, multilabel: bool = False,
                 align_weight: float = 0.1, head_selection: str = "memory"):
        super().__init__(backbone, num_tasks, labels_per_task, multilabel)
        if head_selection not in self.HEAD_SELECTION:
            raise ValueError(f"head_selection must be one of {self.HEAD_SELECTION}, got {head_selection!r}")
        self.align_weight, self.head_selection = align_weight, head_selection
        publish_vilt_modality_ids(backbone)
        self.set_task(0)

    @property
    def tuner(self):
        return self.backbone.base_model

    def set_task(self, task: int) -> None:
        self.tuner.set_task(task)
        super().set_task(task)

    def features(self, inputs: dict, missing: Optional[torch.Tensor], task_ids: Optional[torch.Tensor]):
        """``task_ids`` None: the Task-Key Memory decides at eval (training routes to the current task)."""
        self.tuner.set_missing(missing)
        self.tuner.force_task(task_ids)
        return self.backbone(**inputs).pooler_output

    def forward(self, inputs: dict, missing: Optional[torch.Tensor] = None,
                task_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Logits over every class seen so far. At eval with ``head_selection="memory"`` a sample's
        logits outside the task its pools were routed to (the Task-Key Memory's choice, or
        ``task_ids``) are set to ``MASKED_LOGIT``: the chosen task's experts and classifier decide."""
        logits = super().forward(inputs, missing, task_ids)
        routed = self.tuner.state.task_ids
        if self.training or self.head_selection != "memory" or routed is None:
            return logits
        column_task = torch.arange(logits.shape[-1], device=logits.device) // self.labels_per_task
        return logits.masked_fill(column_task[None, :] != routed.to(logits.device)[:, None], MASKED_LOGIT)

    def extra_loss(self) -> torch.Tensor:
        return self.align_weight * self.tuner.alignment_loss()

    def _meta(self) -> dict:
        return {**super()._meta(), "align_weight": self.align_weight, "head_selection": self.head_selection}


class SequentialLoraClassifier(IncrementalClassifier):
    """The sequential fine-tuning baseline: one peft adapter (LoRA) shared by every task and trained
    on task after task (no task partitioning, no memory), with the same per-task heads and the same
    class-incremental loss and evaluation as ``DeloClassifier``. Earlier heads are frozen; whatever
    the shared adapter learns for a new task changes the features earlier heads read (forgetting)."""

    kind = "lora"

    def __init__(self, backbone: nn.Module, num_tasks: int, labels_per_task: int, multilabel: bool = False):
        super().__init__(backbone, num_tasks, labels_per_task, multilabel)
        self.set_task(0)

    def set_task(self, task: int) -> None:
        super().set_task(task)
        prefix = self.backbone.base_model.prefix   # the peft tuner's parameter prefix ("lora_" for LoRA)
        for name, param in self.backbone.named_parameters():
            param.requires_grad_(prefix in name)

    def features(self, inputs: dict, missing: Optional[torch.Tensor], task_ids: Optional[torch.Tensor]):
        return self.backbone(**inputs).pooler_output


def train_task(model: IncrementalClassifier, task: int, batches: Iterable[CmmlBatch], epochs: int = 1,
               lr: float = 1e-4, weight_decay: float = 0.0) -> list[float]:
    """Train task ``task`` (a fresh optimizer, as RebQ resets it per task); returns the losses."""
    model.set_task(task)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    losses = []
    for _ in range(epochs):
        for batch in batches:
            loss = model.loss(model(batch.inputs, batch.missing), batch.labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.detach().item())
    return losses


@torch.no_grad()
def evaluate_task(model: IncrementalClassifier, batches: Iterable[CmmlBatch]) -> float:
    """Task-agnostic score of one task's test set over every class seen so far."""
    model.eval()
    logits, labels = [], []
    for batch in batches:
        logits.append(model(batch.inputs, batch.missing))
        labels.append(batch.labels)
    return score_task(torch.cat(logits).float().numpy(), torch.cat(labels).numpy(), model.seen_classes,
                      model.multilabel)


def run_continual(model: IncrementalClassifier, tasks: Sequence[tuple[Iterable[CmmlBatch], Iterable[CmmlBatch]]],
                  epochs: int = 1, lr: float = 1e-4, weight_decay: float = 0.0) -> ResultMatrix:
    """Train the tasks in order; after each, score every task seen so far (row of the matrix)."""
    matrix = ResultMatrix(len(tasks))
    for i, (train_batches, _) in enumerate(tasks):
        train_task(model, i, train_batches, epochs=epochs, lr=lr, weight_decay=weight_decay)
        for j in range(i + 1):
            matrix.record(i, j, evaluate_task(model, tasks[j][1]))
    return matrix
