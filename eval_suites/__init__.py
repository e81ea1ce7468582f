"""Evaluation suites that score exactly as the official benchmark scripts do.

``SUITES`` maps a suite name to its class; ``get_suite(name, **options)`` builds one. The
runner (``eval_suites.runner``) generates answers with a ``MultimodalLM`` and scores them.
"""

from __future__ import annotations

from eval_suites.air_bench import AirBench
from eval_suites.ave import Ave
from eval_suites.base import MODES, AnnotationError, EvalSample, Suite
from eval_suites.mmau import Mmau
from eval_suites.mmbench import Mmbench
from eval_suites.mme import Mme
from eval_suites.music_avqa import MusicAvqa
from eval_suites.pope import Pope
from eval_suites.seed_bench import SeedBench

SUITES: dict[str, type[Suite]] = {cls.name: cls for cls in (
    Pope, Mme, Mmbench, SeedBench, Mmau, AirBench, MusicAvqa, Ave)}


def get_suite(name: str, **options) -> Suite:
    try:
        return SUITES[name](**options)
    except KeyError:
        raise ValueError(f"unknown suite {name!r}; available: {', '.join(SUITES)}") from None


__all__ = ["MODES", "SUITES", "AnnotationError", "EvalSample", "Suite", "get_suite"]
