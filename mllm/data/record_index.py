"""Where each record of a LLaVA-format file lies, so a record can be read on its own.

One pass over the file (JSONL, or a JSON list parsed element by element in chunks, never whole)
notes each usable record's byte span and a few numbers about it: its location for messages
(``file:line`` or ``file[index]``), its text length in characters, its turns and its media items
per field. That is all :class:`mllm.data.lazy.LazyMultimodalDataset` keeps in memory (about 30
bytes a record); a record is read again (``os.pread`` + ``json.loads``), validated and tokenised
only when its sample is drawn.
"""

from __future__ import annotations

import codecs
import json
import os
import re
from array import array
from collections import Counter
from typing import Any, Iterator, NamedTuple

import numpy as np

from mllm.data.schema import DataFileNotFoundError, Record, RecordError, parse_record
from mllm.modality import MEDIA_FIELDS

_JSON_SPACE = re.compile(r"[ \t\n\r]*")

#: Bytes read at a time from a JSON list (records are parsed element by element from the buffer).
CHUNK_BYTES = 1 << 20


class RecordSpan(NamedTuple):
    where: str          # "file:line" (JSONL) or "file[index]" (JSON list), as in error messages
    raw: Any            # the parsed object, or the JSONDecodeError of a malformed JSONL line
    offset: int         # byte offset of the record in the file
    size: int           # its length in bytes
    location: int       # its line number (JSONL) or list index (JSON list)


def iter_record_spans(path: str) -> Iterator[RecordSpan]:
    """Each record of a JSON list or JSONL file with its byte span, reading the file in pieces.
    Locations and errors read as those of :func:`mllm.data.schema.iter_raw_records`."""
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        raise DataFileNotFoundError(f"data file not found: {path}") from None
    with f:
        first = f.read(4096).lstrip()
        while not first and f.tell() < os.fstat(f.fileno()).st_size:
            first = f.read(4096).lstrip()
        f.seek(0)
        if first.startswith(b"["):
            yield from _json_list_spans(path, f)
        else:
            yield from _jsonl_spans(path, f)


def _jsonl_spans(path: str, f) -> Iterator[RecordSpan]:
    offset = 0
    for lineno, line in enumerate(f, start=1):
        size = len(line)
        if line.strip():
            where = f"{path}:{lineno}"
            try:
                text = line.decode("utf-8")
            except UnicodeDecodeError as e:
                raise RecordError(where, f"not UTF-8 text ({e})") from None
            try:
                raw = json.loads(text)
            except json.JSONDecodeError as e:
                raw = e
            yield RecordSpan(where, raw, offset, size, lineno)
        offset += size


def _json_list_spans(path: str, f) -> Iterator[RecordSpan]:
    """Elements of a top-level JSON list, decoded one at a time from a sliding text buffer."""
    decoder = json.JSONDecoder()
    utf8 = codecs.getincrementaldecoder("utf-8")()
    text, pos, pos_byte, eof = "", 0, 0, False   # pos_byte: the file offset of text[pos]

    def fill(minimum: int = CHUNK_BYTES) -> bool:
        """Drop the consumed text and append the next chunk; False at the end of the file."""
        nonlocal text, pos, eof
        if eof:
            return False
        chunk = f.read(max(CHUNK_BYTES, minimum))
        try:
            decoded = utf8.decode(chunk, final=not chunk)
        except UnicodeDecodeError as e:
            raise RecordError(path, f"not UTF-8 text ({e})") from None
        text, pos, eof = text[pos:] + decoded, 0, not chunk
        return bool(chunk)

    def skip_space() -> str:
        """The next non-space character ('' at the end of the file), consumed up to it."""
        nonlocal pos, pos_byte
        while True:
            stripped = _JSON_SPACE.match(text, pos).end()   # ASCII: as many bytes as characters
            pos_byte += stripped - pos
            pos = stripped
            if pos < len(text):
                return text[pos]
            if not fill():
                return ""

    def fail(message: str) -> RecordError:
        line, column = _line_and_column(path, pos_byte)
        return RecordError(path, f"invalid JSON at line {line} column {column}: {message}")

    fill()
    if skip_space() != "[":
        raise fail("Expecting '['")
    pos, pos_byte = pos + 1, pos_byte + 1
    index = 0
    if skip_space() == "]":
        return
    while True:
        if not skip_space():
            raise fail("Expecting value")
        wanted = CHUNK_BYTES
        while True:
            try:
                raw, end = decoder.raw_decode(text, pos)
            except json.JSONDecodeError as e:
                into_element = e.pos - pos    # fill() moves the buffer: keep the place relative
                if fill(wanted):   # the element may run past the buffer: read more and retry
                    wanted *= 2
                    continue
                pos_byte += len(text[pos:pos + into_element].encode("utf-8"))
                raise fail(e.msg) from None
            if end == len(text) and fill(wanted):  # a number cut at the buffer's end: read on
                wanted *= 2
                continue
            break
        size = len(text[pos:end].encode("utf-8"))
        yield RecordSpan(f"{path}[{index}]", raw, pos_byte, size, index)
        pos, pos_byte, index = end, pos_byte + size, index + 1
        separator = skip_space()
        if separator == "]":
            pos, pos_byte = pos + 1, pos_byte + 1
            if skip_space():
                raise fail("Extra data")
            return
        if separator != ",":
            raise fail("Expecting ',' delimiter")
        pos, pos_byte = pos + 1, pos_byte + 1


def _line_and_column(path: str, byte_offset: int) -> tuple[int, int]:
    """1-based line and column (in characters) of a byte offset, for an error message."""
    with open(path, "rb") as f:
        before = f.read(byte_offset)
    line_start = before.rfind(b"\n") + 1
    return before.count(b"\n") + 1, len(before[line_start:].decode("utf-8", "replace")) + 1


class RecordIndex:
    """The usable records of one file: byte spans, locations and cheap per-record numbers (text
    characters, turns, media items per field), in file order, as compact arrays."""

    FIELDS = tuple(MEDIA_FIELDS)

    def __init__(self, path: str):
        self.path = path
        self.jsonl = True
        self._offsets, self._sizes, self._locations = array("q"), array("i"), array("i")
        self._chars, self._turns = array("i"), array("i")
        self._media = array("i")   # len(FIELDS) counts per record
        self._fd: tuple[int, int] | None = None   # (process id, descriptor): each process opens its own

    def add(self, span: RecordSpan, record: Record) -> None:
        self.jsonl = not span.where.endswith("]")
        self._offsets.append(span.offset), self._sizes.append(span.size), self._locations.append(span.location)
        self._chars.append(sum([len(m["content"]) for m in record.messages]))
        self._turns.append(len(record.messages))
        media = record.media
        self._media.extend([len(media[name]) if name in media else 0 for name in self.FIELDS])

    def __len__(self) -> int:
        return len(self._offsets)

    def where(self, i: int) -> str:
        return f"{self.path}:{self._locations[i]}" if self.jsonl else f"{self.path}[{self._locations[i]}]"

    @property
    def chars(self) -> np.ndarray:
        return np.frombuffer(self._chars, dtype=np.int32)

    @property
    def turns(self) -> np.ndarray:
        return np.frombuffer(self._turns, dtype=np.int32)

    @property
    def media_counts(self) -> np.ndarray:
        """(records, len(FIELDS)) media items per field."""
        return np.frombuffer(self._media, dtype=np.int32).reshape(len(self), len(self.FIELDS))

    def mixes(self) -> list[tuple[str, ...]]:
        """Each record's modality mix: its sorted media fields."""
        names = np.array(self.FIELDS)
        by_pattern: dict[bytes, tuple[str, ...]] = {}
        present = self.media_counts > 0
        out = []
        for row in present:
            key = row.tobytes()
            if key not in by_pattern:
                by_pattern[key] = tuple(sorted(names[row].tolist()))
            out.append(by_pattern[key])
        return out

    def read_raw(self, i: int) -> Any:
        """The parsed JSON object of record ``i``, read from the file on its own."""
        pid = os.getpid()
        if self._fd is None or self._fd[0] != pid:   # a DataLoader worker (fork) opens its own
            self._fd = (pid, os.open(self.path, os.O_RDONLY))
        data = os.pread(self._fd[1], self._sizes[i], self._offsets[i])
        return json.loads(data)

    def read(self, i: int) -> Record:
        return parse_record(self.where(i), self.read_raw(i))

    def __getstate__(self):   # pickled into spawned DataLoader workers: without the descriptor
        state = dict(self.__dict__)
        state["_fd"] = None
        return state

    def __del__(self):
        if self._fd is not None and self._fd[0] == os.getpid():
            try:
                os.close(self._fd[1])
            except OSError:
                pass


def index_records(path: str, on_bad_sample: str = "error") -> tuple[RecordIndex, Counter]:
    """Every record parsed and validated (as :func:`mllm.data.schema.read_records` does), only its
    place kept. With 'skip' malformed records are dropped and counted by reason."""
    index, skipped = RecordIndex(path), Counter()
    for span in iter_record_spans(path):
        try:
            record = parse_record(span.where, span.raw)
        except RecordError as e:
            if on_bad_sample != "skip":
                raise
            skipped[e.reason] += 1
            continue
        index.add(span, record)
    return index, skipped
