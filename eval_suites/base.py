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
import re
from dataclasses import dataclass, field
from typing import Any, Iterator

from mllm.errors import UserError
from mllm.modality import MEDIA_FIELDS

MODES = ("official", "strict")


class AnnotationError(UserError):
    """A malformed annotation file or line; the message starts with ``file:line``."""

    def __init__(self, where: str, message: str):
        super().__init__(f"{where}: {message}")
        self.where = where


class AnnotationFileNotFoundError(AnnotationError, FileNotFoundError):
    """A file or folder the user named is not there (a user error, and a FileNotFoundError)."""

    def __init__(self, path: str, message: str = "annotation file not found"):
        super().__init__(path, message)


@dataclass
class EvalSample:
    id: str                                   # unique within one run; the key of the answer log
    question: str                             # prompt text without placeholders or suffix
    media: dict[str, list[str]]               # record field ("image", "audio", ...) -> paths
    target: Any                               # the reference answer as the benchmark states it
    meta: dict[str, Any] = field(default_factory=dict)  # categories, options, original fields
    inline_media: dict[str, bytes] = field(default_factory=dict)  # path -> bytes (MMBench TSVs)
    where: str = ""                           # "file:line" of the annotation it comes from


class Suite:
    """One benchmark. Subclasses set the class attributes and implement the three methods.

    Constructor keyword arguments are the suite's options (``get_suite(name, **options)``,
    ``mllm eval --option KEY=VALUE``); ``get_suite`` keeps the ones given in ``self.options``,
    which the runner records in the results.
    """

    name: str = ""
    #: record fields the model must be able to encode ("image", "video", "audio", "speech")
    media_fields: tuple[str, ...] = ("image",)
    max_new_tokens: int = 16
    #: appended to every question, as the benchmark's protocol (or its reference harness) says
    prompt_suffix: str = ""
    #: how a sample's id (the key of an answer log line) is made from the annotation
    id_scheme: str = ""
    #: the benchmark's own answer format, which ``mllm eval --answers`` also reads
    answer_format: str = "the benchmark's own answer format"
    #: option -> what it does, for ``mllm eval --help`` (defaults come from the constructor)
    option_help: dict[str, str] = {}

    def load(self, path: str) -> list[EvalSample]:
        raise NotImplementedError

    def score(self, samples: list[EvalSample], predictions: dict[str, str], mode: str = "official") -> dict:
        raise NotImplementedError

    def read_answer_file(self, path: str, samples: list[EvalSample]):
        """Read ``path`` if it is in the benchmark's own answer format (``answer_format``):
        ``(format name, [AnswerRow], notes)``, or None when it is not. Rows carry sample ids
        (``id_scheme``); matching and counting are ``eval_suites.answers``' job."""
        return None

    def samples_from_answers(self, path: str) -> list[EvalSample] | None:
        """Samples built from an answer file that holds the ground truth too (MME's results
        folder), for scoring without the annotation files; None when it cannot."""
        return None

    def write_official_files(self, samples: list[EvalSample], predictions: dict[str, str],
                             out_dir: str) -> list[str]:
        """Write the files the official scorer (or submission server) reads; return their paths."""
        return []

    def prompt(self, sample: EvalSample, prompt_suffix: str | None = None) -> str:
        """The user turn: one placeholder line per media item, then the question and suffix."""
        suffix = self.prompt_suffix if prompt_suffix is None else prompt_suffix
        lines = [MEDIA_FIELDS[f] for f, paths in sample.media.items() for _ in paths]
        return "\n".join(lines + [sample.question + suffix])


def check_option_choice(suite: str, option: str, value, allowed: tuple) -> None:
    """A suite option that takes one of a few values."""
    if value not in allowed:
        raise ValueError(f"{suite} option {option} must be one of {', '.join(map(str, allowed))}; got {value!r}")


def check_media_template(suite: str, option: str, value) -> str:
    """A media path template such as ``videos/{video_id}.mp4``."""
    hint = (f"a path template with {{video_id}}, such as 'videos/{{video_id}}.mp4' (on the command line, quote "
            f"a value that starts with '{{': --option '{option}=\"{{video_id}}.mp4\"')")
    if not isinstance(value, str) or "{video_id}" not in value:
        raise ValueError(f"{suite} option {option} must be {hint}; got {value!r}")
    try:
        value.format(video_id="x")
    except (KeyError, IndexError, ValueError) as e:
        raise ValueError(f"{suite} option {option}: {value!r} may use only the field {{video_id}} ({e!r})") from None
    return value


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


def iter_json_lines(path: str) -> Iterator[tuple[str, Any]]:
    """Yield ``("file:line", object)`` for each non-blank line of a JSON-lines file."""
    try:
        f = open(path, encoding="utf-8")
    except FileNotFoundError:
        raise AnnotationFileNotFoundError(path) from None
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
    """Yield ``(where, object)`` for each record of a JSON list -- ``where`` is
    ``"file:line (record i of the JSON list, 0-based)"``, the line being the one the record
    starts on -- or ``("file:line", object)`` for JSON lines (several benchmarks ship JSON
    lines under a ``.json`` name)."""
    try:
        with open(path, encoding="utf-8-sig") as f:
            head = f.read(1024).lstrip()
    except FileNotFoundError:
        raise AnnotationFileNotFoundError(path) from None
    if head.startswith("["):
        for index, (line, item) in enumerate(read_json_list(path)):
            yield f"{path}:{line} (record {index} of the JSON list, 0-based)", item
    else:
        yield from iter_json_lines(path)


# A JSON list read record by record with ``json.JSONDecoder.raw_decode``, so that each record's
# line number is known (``json.load`` forgets where things were).

_WHITESPACE = re.compile(r"[ \t\n\r]*")


class _LineCounter:
    """Line number of a text offset; offsets must be asked in increasing order."""

    def __init__(self, text: str):
        self.text, self.offset, self.line = text, 0, 1

    def __call__(self, offset: int) -> int:
        self.line += self.text.count("\n", self.offset, offset)
        self.offset = offset
        return self.line


def _read_text(path: str) -> str:
    try:
        with open(path, encoding="utf-8-sig") as f:
            return f.read()
    except FileNotFoundError:
        raise AnnotationFileNotFoundError(path) from None


def _decode(decoder: json.JSONDecoder, text: str, pos: int, path: str) -> tuple[Any, int]:
    try:
        return decoder.raw_decode(text, pos)
    except json.JSONDecodeError as e:
        raise AnnotationError(f"{path}:{e.lineno}", f"invalid JSON at column {e.colno}: {e.msg}") from None


def _list_with_lines(text: str, pos: int, path: str, lines: _LineCounter) -> tuple[list[tuple[int, Any]], int]:
    """Parse the JSON list starting at ``text[pos] == "["``: ``([(line, item), ...], end offset)``."""
    decoder, items = json.JSONDecoder(), []
    pos = _WHITESPACE.match(text, pos + 1).end()
    if text.startswith("]", pos):
        return items, pos + 1
    while True:
        line = lines(pos)
        item, pos = _decode(decoder, text, pos, path)
        items.append((line, item))
        pos = _WHITESPACE.match(text, pos).end()
        if text.startswith(",", pos):
            pos = _WHITESPACE.match(text, pos + 1).end()
        elif text.startswith("]", pos):
            return items, pos + 1
        else:
            raise AnnotationError(f"{path}:{lines(pos)}", "invalid JSON: expected ',' or ']' after a list item")


def _expect_end(text: str, pos: int, path: str, lines: _LineCounter) -> None:
    pos = _WHITESPACE.match(text, pos).end()
    if pos != len(text):
        raise AnnotationError(f"{path}:{lines(pos)}", "invalid JSON: extra data after the top-level value")


def read_json_list(path: str) -> list[tuple[int, Any]]:
    """A file holding one JSON list: ``[(line the record starts on, record), ...]``."""
    text = _read_text(path)
    lines = _LineCounter(text)
    pos = _WHITESPACE.match(text).end()
    if not text.startswith("[", pos):
        raise AnnotationError(f"{path}:{lines(pos)}", "expected a JSON list")
    items, pos = _list_with_lines(text, pos, path, lines)
    _expect_end(text, pos, path, lines)
    return items


def read_json_object_with_list(path: str, key: str) -> tuple[dict, list[tuple[int, Any]]]:
    """A file holding one JSON object whose ``key`` member is a list (SEED-Bench's
    ``{"questions": [...], ...}``): ``(the object, [(line, item), ...] of that list)``; the
    object's ``key`` holds the plain items."""
    text = _read_text(path)
    lines = _LineCounter(text)
    decoder, data, tracked = json.JSONDecoder(), {}, None
    pos = _WHITESPACE.match(text).end()
    if not text.startswith("{", pos):
        raise AnnotationError(f"{path}:{lines(pos)}", "expected a JSON object")
    pos = _WHITESPACE.match(text, pos + 1).end()
    closed = text.startswith("}", pos)
    pos += closed
    while not closed:
        if not text.startswith('"', pos):
            raise AnnotationError(f"{path}:{lines(pos)}", "invalid JSON: expected a member name in double quotes")
        name, pos = _decode(decoder, text, pos, path)
        pos = _WHITESPACE.match(text, pos).end()
        if not text.startswith(":", pos):
            raise AnnotationError(f"{path}:{lines(pos)}", "invalid JSON: expected ':' after a member name")
        pos = _WHITESPACE.match(text, pos + 1).end()
        if name == key and text.startswith("[", pos):
            tracked, pos = _list_with_lines(text, pos, path, lines)
            data[name] = [item for _, item in tracked]
        else:
            lines(pos)
            data[name], pos = _decode(decoder, text, pos, path)
        pos = _WHITESPACE.match(text, pos).end()
        if text.startswith(",", pos):
            pos = _WHITESPACE.match(text, pos + 1).end()
        elif text.startswith("}", pos):
            pos, closed = pos + 1, True
        else:
            raise AnnotationError(f"{path}:{lines(pos)}", "invalid JSON: expected ',' or '}' after a member")
    _expect_end(text, pos, path, lines)
    if tracked is None or not isinstance(data.get(key), list):
        tracked = None
    return data, tracked or []


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
