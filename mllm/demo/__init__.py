"""The embedded demos: ``mllm demo`` (stage 1, stage 2, evaluation), ``--missing-modality``, ``--continual``."""

from __future__ import annotations

import contextlib


@contextlib.contextmanager
def torch_threads(count: int | None):
    """Run with ``count`` torch threads (default 1: the small demos' tiny matrices run fastest on
    one), restoring the previous setting afterwards."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(count or 1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
