"""Evaluation suites that score exactly as the official benchmark scripts do.

``SUITES`` maps a suite name to its class; ``get_suite(name, **options)`` builds one. The
runner (``eval_suites.runner``) generates answers with a ``MultimodalLM`` and scores them.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil

from eval_suites.base import MODES, AnnotationError, EvalSample, Suite

#: Modules of this package that hold no benchmark.
_NOT_SUITES = {"answers", "base", "parsing", "runner"}


def _discover() -> dict[str, type[Suite]]:
    """Every ``Suite`` subclass in this package's modules: adding a benchmark is adding a module."""
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if info.name not in _NOT_SUITES:
            importlib.import_module(f"{__name__}.{info.name}")
    found = {}
    for cls in Suite.__subclasses__():
        if cls.name in found:
            raise RuntimeError(f"two suites are named {cls.name!r}: {found[cls.name].__module__} and {cls.__module__}")
        found[cls.name] = cls
    return found


SUITES: dict[str, type[Suite]] = _discover()


def suite_options(name: str) -> dict[str, object]:
    """The options suite ``name`` takes (its constructor's keyword arguments) and their defaults."""
    if name not in SUITES:
        raise ValueError(f"unknown suite {name!r}; available: {', '.join(SUITES)}")
    init = SUITES[name].__init__
    if init is object.__init__:
        return {}
    return {p.name: p.default for p in inspect.signature(init).parameters.values()
            if p.name != "self" and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


def get_suite(name: str, **options) -> Suite:
    """Build suite ``name`` with ``options`` (see ``suite_options``); an unknown option is an
    error that lists the valid ones. The options given are kept in ``suite.options``."""
    valid = suite_options(name)
    unknown = [k for k in options if k not in valid]
    if unknown:
        listed = (", ".join(f"{k} (default {v!r})" for k, v in valid.items()) if valid
                  else "none, this suite takes no options")
        raise ValueError(f"suite {name!r} has no option {', '.join(map(repr, unknown))}; valid options: {listed}")
    suite = SUITES[name](**options)
    suite.options = dict(options)
    return suite


__all__ = ["MODES", "SUITES", "AnnotationError", "EvalSample", "Suite", "get_suite", "suite_options"]
