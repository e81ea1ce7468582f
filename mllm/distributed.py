"""Where this process runs and what ZeRO-3 did to a parameter: rank, local device, partitioning
and gathering helpers, in one place for the model, the trainer, the tuners and the feature cache."""

from __future__ import annotations

import contextlib
import os
from typing import Iterable, Optional

import torch


def local_device() -> str:
    """This process's device: its GPU under a launcher (``LOCAL_RANK``), else the CPU."""
    return f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu"


def several_ranks() -> bool:
    """Data-parallel with more than one process (a collective must then run on every rank)."""
    return torch.distributed.is_available() and torch.distributed.is_initialized() \
        and torch.distributed.get_world_size() > 1


def is_partitioned(param: torch.Tensor) -> bool:
    """ZeRO-3 holds only this rank's slice of ``param``."""
    return hasattr(param, "ds_id")


def full_numel(param: torch.Tensor) -> int:
    """Elements of ``param`` counted at its full size, also when ZeRO-3 has partitioned it."""
    return getattr(param, "ds_numel", param.numel())


def gathered_parameters(params: Iterable[torch.Tensor], modifier_rank: Optional[int] = None):
    """Context in which ZeRO-3-partitioned ``params`` hold their full values (a collective: every
    rank must enter it). With ``modifier_rank``, that rank's in-place changes are kept and
    re-partitioned on exit. Parameters that are not partitioned pass through untouched."""
    partitioned = [p for p in params if is_partitioned(p)]
    if not partitioned:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(partitioned, modifier_rank=modifier_rank)


def end_process_group() -> None:
    """Ranks leave together and the process group is torn down before the interpreter exits: left
    to interpreter shutdown, gloo's threads can abort a rank ('terminate called without an active
    exception') after its work is saved, failing the launch."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
