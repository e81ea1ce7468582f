"""DeepSpeed ZeRO-3 helpers shared by the trainer and the tuners."""

from __future__ import annotations

import contextlib
from typing import Iterable, Optional

import torch


def gathered_parameters(params: Iterable[torch.Tensor], modifier_rank: Optional[int] = None):
    """Context in which ZeRO-3-partitioned ``params`` hold their full values (a collective: every
    rank must enter it). With ``modifier_rank``, that rank's in-place changes are kept and
    re-partitioned on exit. Parameters that are not partitioned pass through untouched."""
    partitioned = [p for p in params if hasattr(p, "ds_id")]
    if not partitioned:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(partitioned, modifier_rank=modifier_rank)
