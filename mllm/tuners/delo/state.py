"""The per-forward routing state shared by every DeLo layer of a model.

DeLo routes with *per-sample* query signals taken from the frozen backbone (figure 2): before the
adapted forward, ``DeloModel`` runs the backbone once with every DeLo path bypassed, mean-pools its
last hidden states over each sample's visual and text tokens, picks the task of each sample (given,
or from the Task-Key Memory) and publishes the result here. Layers hold a plain reference to this
one object (not a submodule: nothing here is saved). The state is sticky until the next forward,
so a gradient-checkpointing recomputation sees the same routing.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator, Optional

import torch

#: Missing-modality codes, MMP's convention (as in ``mllm.classify.missing``).
COMPLETE, TEXT_MISSING, IMAGE_MISSING = 0, 1, 2


@dataclass
class TaskRoute:
    """Routing inputs of one task for the whole batch; ``weight`` (B,) is 1 for the samples routed
    to this task, 0 elsewhere (dense masking, no boolean indexing)."""

    task: int
    query_visual: torch.Tensor   # (B, query_dim): q_v, or q_t standing in when the image is missing
    query_text: torch.Tensor     # (B, query_dim): q_t, or q_v standing in when the text is missing
    weight: torch.Tensor         # (B,)


@dataclass
class DeloState:
    bypass: bool = False                          # True during the frozen query pass
    routes: list[TaskRoute] = field(default_factory=list)
    task_ids: Optional[torch.Tensor] = None       # (B,) task chosen for each sample
    # For the alignment loss: the current forward's un-substituted queries of the routed task.
    align_pairs: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = field(default_factory=list)
    # Caller-supplied, sticky until changed (DeloModel.set_missing / force_task).
    missing: Optional[torch.Tensor] = None        # (B,) codes COMPLETE / TEXT_MISSING / IMAGE_MISSING
    forced_task: Optional[torch.Tensor] = None    # (B,) or None: use the Task-Key Memory at eval

    @contextmanager
    def bypassing(self) -> Iterator[None]:
        previous, self.bypass = self.bypass, True
        try:
            yield
        finally:
            self.bypass = previous
