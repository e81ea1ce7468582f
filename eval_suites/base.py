"""The suite interface shared by every benchmark module, and helpers for reading annotations.

A suite turns the benchmark's own annotation files into ``EvalSample``s (prompt text, media
paths, reference answer, the fields scoring needs), states its generation settings, and
scores a mapping ``sample id -> model output`` in one of two modes:

* ``official`` reproduces the number the benchmark's official script prints, quirks included
  (case-sensitive parsing, unparseable answers dropped from the denominator, ...);
* ``strict`` counts every question and parses answers robustly; an answer that still cannot
  be parsed counts as wrong.

Every results dict says which mode produced it and how many answers failed to parse.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any, Iterator

from mllm.modality import MEDIA_FIELDS

MODES = ("official", "strict")


class AnnotationError(ValueError):
    """A malformed annotation file or line; the message starts with ``file:line``."""

    def __init__(self, where: str, message: str):
        super().__init__(f"{where}: {message}")
        self.where = where


@dataclass
class EvalSample:
    id: str                                   # unique within one run; the key of the answer log
    question: str                             # prompt text without placeholders or suffix
    media: dict[str, list[str]]               # record field ("image", "audio", ...) -> paths
    target: Any                               # the reference answer as the benchmark states it
    meta: dict[str, Any] = field(default_factory=dict)  # categories, options, original fields
    inline_media: dict[str, bytes] = field(default_factory=dict)  # path -> bytes (MMBench TSVs)


class Suite:
    """One benchmark. Subclasses set the class attributes and implement the three methods."""

    name: str = ""
    #: record fields the model must be able to encode ("image", "video", "audio", "speech")
    media_fields: tuple[str, ...] = ("image",)
    max_new_tokens: int = 16
    #: appended to every question, as the benchmark's protocol (or its reference harness) says
    prompt_suffix: str = ""

    def load(self, path: str) -> list[EvalSample]:
        raise NotImplementedError

    def score(self, samples: list[EvalSample], predictions: dict[str, str], mode: str = "official") -> dict:
        raise NotImplementedError

    def write_official_files(self, samples: list[EvalSample], predictions: dict[str, str],
                             out_dir: str) -> list[str]:
        """Write the files the official scorer (or submission server) reads; return their paths."""
        return []

    def prompt(self, sample: EvalSample, prompt_suffix: str | None = None) -> str:
        """The user turn: one placeholder line per media item, then the question and suffix."""
        suffix = self.prompt_suffix if prompt_suffix is None else prompt_suffix
        lines = [MEDIA_FIELDS[f] for f, paths in sample.media.items() for _ in paths]
        return "\n".join(lines + [sample.question + suffix])


def check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"unknown scoring mode {mode!r}; expected one of {MODES}")


def results_header(suite: Suite, mode: str, samples: list[EvalSample], predictions: dict[str, str],
                   parse_failures: int, scored: int) -> dict:
    """The fields every results dict starts with."""
    return {"suite": suite.name, "mode": mode, "num_samples": len(samples),
            "num_answered": sum(1 for s in samples if s.id in predictions),
            "num_scored": scored, "parse_failures": parse_failures}


def ratio(numerator: float, denominator: float) -> float | None:
    """``numerator / denominator``; None where the official script would divide by zero."""
    return numerator / denominator if denominator else None


def mean_of(hits: list) -> float | None:
    return ratio(sum(hits), len(hits))


# --------------------------------------------------------------------------- reading files


def read_json(path: str) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"annotation file not found: {path}") from None
    except json.JSONDecodeError as e:
        raise AnnotationError(f"{path}:{e.lineno}", f"invalid JSON at column {e.colno}: {e.msg}") from None


def iter_json_lines(path: str) -> Iterator[tuple[str, Any]]:
    """Yield ``("file:line", object)`` for each non-blank line of a JSON-lines file."""
    try:
        f = open(path, encoding="utf-8")
    except FileNotFoundError:
        raise FileNotFoundError(f"annotation file not found: {path}") from None
    with f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                yield where, json.loads(line)
            except json.JSONDecodeError as e:
                raise AnnotationError(where, f"malformed JSON line ({e.msg} at column {e.colno})") from None


def iter_json_items(path: str) -> Iterator[tuple[str, Any]]:
    """Yield ``("file[index]", object)`` for a JSON list, or ``("file:line", object)`` for
    JSON lines (several benchmarks ship JSON lines under a ``.json`` name)."""
    with open(path, encoding="utf-8") as f:
        head = f.read(1024).lstrip()
    if head.startswith("["):
        for index, item in enumerate(read_json(path)):
            yield f"{path}[{index}]", item
    else:
        yield from iter_json_lines(path)


def require_fields(where: str, item: Any, fields: tuple[str, ...]) -> dict:
    if not isinstance(item, dict):
        raise AnnotationError(where, f"expected a JSON object, got {type(item).__name__}")
    missing = [k for k in fields if k not in item]
    if missing:
        raise AnnotationError(where, f"missing field(s) {', '.join(map(repr, missing))}")
    return item


def write_json_lines(path: str, rows) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path
