"""Interleaved timing shared by the overhead benchmarks: each round runs every model in a shuffled
order (no model always first, or always right after the same other one), and ratios are taken per
round, so drift in the machine's speed cancels out of them."""

from __future__ import annotations

import random
import statistics
import time
from typing import Callable


def timed_rounds(runs: dict[str, Callable[[], object]], repeats: int, block: int = 1,
                 warmup: int = 3, clock: Callable[[], float] = time.perf_counter) -> dict[str, list[float]]:
    """Seconds per call of each run, one sample per round (the mean of ``block`` calls); ``clock``
    e.g. ``time.process_time`` for a single-threaded CPU run on a shared machine."""
    for run in runs.values():
        for _ in range(warmup):
            run()
    samples: dict[str, list[float]] = {name: [] for name in runs}
    order = list(runs)
    shuffle = random.Random(0).shuffle
    for _ in range(repeats):
        shuffle(order)
        for name in order:
            run = runs[name]
            start = clock()
            for _ in range(block):
                run()
            samples[name].append((clock() - start) / block)
    return samples


def ratio_stats(samples: dict[str, list[float]], num: str, den: str) -> tuple[float, float, float]:
    """Median and quartiles of the per-round ratios num / den."""
    ratios = sorted(a / b for a, b in zip(samples[num], samples[den]))
    q = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratios[0]] * 3
    return statistics.median(ratios), q[0], q[2]
