"""LLaVA-style conversation records: reading and validating them.

A record (one JSON object, in a JSON list or one per line of a JSONL file)::

    {"id": "...", "image": "a.png" | ["a.png", "b.png"], "video": ..., "audio": ..., "speech": ...,
     "conversations": [{"from": "human", "value": "<image>\\nWhat is it?"}, {"from": "gpt", "value": "..."}]}

Every error names the file, the line (JSONL) or index (JSON list) and the record id.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterator

from mllm.errors import UserError
from mllm.modality import MEDIA_FIELDS

ROLE_NAMES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


class RecordError(UserError):
    """A malformed record. ``reason`` is a short category used when counting skips."""

    def __init__(self, where: str, message: str, reason: str = "malformed record"):
        super().__init__(f"{where}: {message}")
        self.reason = reason


@dataclass
class Record:
    id: str
    messages: list[dict[str, str]]          # {"role": user|assistant|system, "content": str}
    media: dict[str, list[str]]             # record field ("image", "video", ...) -> paths
    where: str                              # "file:line" for error messages
    extra: dict[str, Any] = field(default_factory=dict)  # any other fields (answer, question_type, ...)


class DataFileNotFoundError(UserError, FileNotFoundError):
    pass


def iter_raw_records(path: str) -> Iterator[tuple[str, Any]]:
    """Yield (location, parsed object or JSONDecodeError) for a JSON list or a JSONL file."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        raise DataFileNotFoundError(f"data file not found: {path}") from None
    except UnicodeDecodeError as e:
        raise RecordError(path, f"not UTF-8 text ({e})") from None
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as e:
            raise RecordError(path, f"invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
        for index, item in enumerate(items):
            yield f"{path}[{index}]", item
        return
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            yield f"{path}:{lineno}", json.loads(line)
        except json.JSONDecodeError as e:
            yield f"{path}:{lineno}", e


def parse_record(where: str, raw: Any) -> Record:
    if isinstance(raw, json.JSONDecodeError):
        raise RecordError(where, f"malformed JSON line ({raw.msg} at column {raw.colno})", "malformed JSON")
    if not isinstance(raw, dict):
        raise RecordError(where, f"expected a JSON object, got {type(raw).__name__}")
    record_id = str(raw.get("id", where))
    here = f"{where}: record '{record_id}'"
    conversations = raw.get("conversations")
    if not isinstance(conversations, list) or not conversations:
        raise RecordError(here, "'conversations' must be a non-empty list")
    messages = []
    for turn_index, turn in enumerate(conversations):
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
            raise RecordError(here, f"conversations[{turn_index}] must be an object with a string 'value'")
        role = ROLE_NAMES.get(turn.get("from"))
        if role is None:
            raise RecordError(here, f"conversations[{turn_index}].from = {turn.get('from')!r}; "
                                    f"expected one of {sorted(ROLE_NAMES)}")
        messages.append({"role": role, "content": turn["value"]})
    media: dict[str, list[str]] = {}
    for media_field in MEDIA_FIELDS:
        value = raw.get(media_field)
        if value is None:
            continue
        paths = [value] if isinstance(value, str) else value
        if not isinstance(paths, list) or not all(isinstance(p, str) and p for p in paths):
            raise RecordError(here, f"'{media_field}' must be a path or a list of paths")
        media[media_field] = paths
    media = _sound_from_video(messages, media)
    check_placeholder_counts(here, messages, media)
    known = {"id", "conversations", *MEDIA_FIELDS}
    extra = {k: v for k, v in raw.items() if k not in known}
    return Record(id=record_id, messages=messages, media=media, where=where, extra=extra)


def _sound_from_video(messages: list[dict], media: dict[str, list[str]]) -> dict[str, list[str]]:
    """A record that names only videos can use their sound: ``<audio>`` then reads the audio
    tracks of the ``video`` files (an explicit ``audio`` field always wins)."""
    text = "".join(m["content"] for m in messages)
    if "audio" in media or "video" not in media or text.count("<audio>") != len(media["video"]):
        return media
    media = {**media, "audio": list(media["video"])}
    if "<video>" not in text:  # the video serves only its sound
        del media["video"]
    return media


def check_placeholder_counts(here: str, messages: list[dict], media: dict[str, list[str]]) -> None:
    """Each placeholder must occur exactly as often as its field lists media."""
    text = "".join(m["content"] for m in messages)
    for media_field, placeholder in MEDIA_FIELDS.items():
        found = text.count(placeholder)
        given = len(media.get(media_field, []))
        if found != given:
            raise RecordError(here, f"{found} {placeholder} placeholder(s) in the conversation but "
                                    f"{given} '{media_field}' file(s)", "placeholder count mismatch")


def read_records(path: str, on_bad_sample: str = "error") -> tuple[list[Record], Counter]:
    """Parse and validate every record. With ``on_bad_sample='skip'`` malformed records are
    dropped and counted by reason; with 'error' the first one raises ``RecordError``."""
    records, skipped = [], Counter()
    for where, raw in iter_raw_records(path):
        try:
            records.append(parse_record(where, raw))
        except RecordError as e:
            if on_bad_sample != "skip":
                raise
            skipped[e.reason] += 1
    return records, skipped
