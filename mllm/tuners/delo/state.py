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
from typing import TYPE_CHECKING, Iterator, Optional

import torch

if TYPE_CHECKING:
    from mllm.tuners.delo.packing import PackedSamples

#: Missing-modality codes, MMP's convention (as in ``mllm.classify.missing``).
COMPLETE, TEXT_MISSING, IMAGE_MISSING = 0, 1, 2


@dataclass
class TaskRoute:
    """Routing inputs of one task for the whole batch; ``weight`` (B,) is 1 for the samples routed
    to this task, 0 elsewhere (dense masking, no boolean indexing).

    The query signals come from the frozen pooled features and the task's query maps (a (B, d) x
    (d, d) product). With ``shared`` (no activation checkpointing: nothing is recomputed) they are
    computed once per forward and every layer uses them; otherwise on every call, since a layer that
    reentrant gradient checkpointing recomputes must build its own graph to the query maps (one
    graph shared by every layer would be freed by the first recomputed layer's backward)."""

    task: int
    pooled: torch.Tensor         # (B, 2, query_dim) frozen pooled features (visual, text), detached
    available: torch.Tensor      # (B, 2) bool: the sample has that modality
    proj_visual: torch.Tensor    # the task's query maps (the parameters themselves)
    proj_text: torch.Tensor
    weight: torch.Tensor         # (B,)
    shared: bool = False         # compute the queries once for every layer (see above)
    _computed: dict = field(default_factory=dict, repr=False)

    def raw_queries(self) -> tuple[torch.Tensor, torch.Tensor]:
        """q_v, q_t before guided routing (the alignment loss compares these)."""
        if self.shared and "raw" in self._computed:
            return self._computed["raw"]
        q_visual = self.pooled[:, 0].to(self.proj_visual.dtype) @ self.proj_visual.T
        q_text = self.pooled[:, 1].to(self.proj_text.dtype) @ self.proj_text.T
        if self.shared:
            self._computed["raw"] = (q_visual, q_text)
        return q_visual, q_text

    def queries(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Cross-modal guided routing: the available modality's query stands in for the missing one
        (q_v for image-missing samples is q_t, and the other way round)."""
        if self.shared and "guided" in self._computed:
            return self._computed["guided"]
        q_visual, q_text = self.raw_queries()
        guided = (torch.where(self.available[:, :1], q_visual, q_text),
                  torch.where(self.available[:, 1:], q_text, q_visual))
        if self.shared:
            self._computed["guided"] = guided
        return guided

    @property
    def query_visual(self) -> torch.Tensor:
        return self.queries()[0]

    @property
    def query_text(self) -> torch.Tensor:
        return self.queries()[1]


@dataclass
class DeloState:
    bypass: bool = False                          # True during the frozen query pass
    routes: list[TaskRoute] = field(default_factory=list)
    task_ids: Optional[torch.Tensor] = None       # (B,) task chosen for each sample
    # For the alignment loss: the current forward's un-substituted queries of the routed task.
    align_pairs: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = field(default_factory=list)
    # Packed rows (data.packing): where each routed sample sits; None when every row is one sample.
    samples: Optional["PackedSamples"] = None
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
