"""What every native data source shares: the reader interface and small helpers.

A source reads one dataset in its released layout and yields ``(where, record)`` pairs: ``where``
names the native file and line or index (for error messages), ``record`` is a LLaVA-style dict
(``id``, media fields, ``conversations``, any extra fields) whose media paths are relative to the
source's ``media_root``.
"""

from __future__ import annotations

import csv
import json
import os
from typing import Any, Iterator

from mllm.data.schema import RecordError

Located = tuple[str, dict[str, Any]]


class Source:
    """One native dataset format. Subclasses set ``name`` and ``summary``, take their options as
    keyword arguments of ``__init__`` (with defaults), and implement ``read``."""

    name: str = ""
    summary: str = ""

    def read(self, path: str) -> Iterator[Located]:
        raise NotImplementedError


def conversation(question: str, answer: str | None) -> list[dict[str, str]]:
    """One human turn and, when there is an answer, one gpt turn."""
    turns = [{"from": "human", "value": question}]
    if answer is not None:
        turns.append({"from": "gpt", "value": answer})
    return turns


def media_path(template: str, where: str, values: dict[str, Any], option: str) -> str:
    """Fill a path template such as ``video_data/{video_id}.mp4`` from a record's fields."""
    try:
        return template.format(**values)
    except (KeyError, IndexError) as e:
        raise RecordError(where, f"option {option}={template!r} names field {e} that the record lacks "
                                 f"(fields: {sorted(values)})") from None


def require_fields(where: str, item: Any, fields: tuple[str, ...]) -> None:
    if not isinstance(item, dict):
        raise RecordError(where, f"expected a JSON object, got {type(item).__name__}")
    missing = [f for f in fields if f not in item]
    if missing:
        raise RecordError(where, f"missing field(s) {missing}; found {sorted(item)}")


def read_json(path: str) -> Any:
    if not os.path.isfile(path):
        raise RecordError(path, "file not found")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise RecordError(path, f"invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
    except UnicodeDecodeError as e:
        raise RecordError(path, f"not UTF-8 text ({e})") from None


def json_list(path: str) -> Iterator[tuple[str, Any]]:
    """``(path[index], item)`` for a JSON list, or ``(path:line, item)`` for JSONL."""
    if not os.path.isfile(path):
        raise RecordError(path, "file not found")
    with open(path, encoding="utf-8") as f:
        head = f.read(4096).lstrip()
    if head.startswith("["):
        for index, item in enumerate(read_json(path)):
            yield f"{path}[{index}]", item
        return
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if line.strip():
                try:
                    yield f"{path}:{lineno}", json.loads(line)
                except json.JSONDecodeError as e:
                    raise RecordError(f"{path}:{lineno}",
                                      f"malformed JSON line ({e.msg} at column {e.colno})") from None


def csv_rows(path: str, required: tuple[str, ...]) -> Iterator[tuple[str, dict[str, str]]]:
    """``(path:line, row)`` for a CSV with a header naming at least ``required``. UTF-8, falling
    back to ISO-8859-1 (Clotho's v2 metadata files use it)."""
    if not os.path.isfile(path):
        raise RecordError(path, "file not found")
    for encoding in ("utf-8-sig", "iso-8859-1"):
        try:
            with open(path, encoding=encoding, newline="") as f:
                text = f.read()
            break
        except UnicodeDecodeError:
            continue
    reader = csv.DictReader(text.splitlines())
    header = reader.fieldnames or []
    missing = [c for c in required if c not in header]
    if missing:
        raise RecordError(f"{path}:1", f"CSV header lacks column(s) {missing}; found {header}")
    for row in reader:
        yield f"{path}:{reader.line_num}", row
