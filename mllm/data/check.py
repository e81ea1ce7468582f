"""Pre-flight check of a data file, before any model loads: the one place records are validated.

``check_data`` reads every record (``mllm.data.schema``: JSON, conversation turns, placeholder
counts) and adds what only shows against the run: fields that look like media but are not one
of the media fields (``images``, ``depth``: a typo would otherwise train the record as
text-only), media of a modality the model has no encoder for, and media files that do not exist.
Media files are not decoded here (that happens when a sample is drawn); a corrupt file is caught
then, and under ``on_bad_sample: skip`` counted once.

With a :class:`LengthLimit` each record is also tokenised (template, text, each media item as the
tokens it becomes) and one longer than the context is a problem ('longer than context'), as
training would find it. With ``index=True`` only where each usable record lies is kept
(:mod:`mllm.data.record_index`), for the lazy dataset.

With ``on_bad_sample='error'`` the first problem raises (a RecordError naming file, line, record
and field); with ``'skip'`` each bad record is dropped and counted once, under one reason.
"""

from __future__ import annotations

import difflib
import os
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from mllm.data.media import resolve_media_path
from mllm.data.record_index import RecordIndex, iter_record_spans
from mllm.data.schema import Record, RecordError, parse_record
from mllm.data.templates import LabelAlignmentError, tokenize_conversation
from mllm.modality import MEDIA_FIELDS, PLACEHOLDERS, modality_from_name

# File extensions of media a record could name (a field holding such paths is a media field).
MEDIA_EXTENSIONS = {".png", ".jpg", ".jpeg", ".gif", ".bmp", ".webp", ".tif", ".tiff", ".mp4", ".avi", ".mov",
                    ".mkv", ".webm", ".wav", ".flac", ".mp3", ".ogg", ".m4a", ".aac", ".opus"}


@dataclass
class DataReport:
    """What a data file holds: usable records (or, with ``index=True``, only where they lie), and bad
    ones counted by reason (each record once)."""

    path: str
    records: list[Record] = field(default_factory=list)
    skipped: Counter = field(default_factory=Counter)          # reason -> records
    examples: dict[str, str] = field(default_factory=dict)     # reason -> the first such error
    index: RecordIndex | None = None                          # check_data(index=True): spans, not records
    per_modality: Counter = field(default_factory=Counter)     # media field (or text-only) -> usable records

    @property
    def num_records(self) -> int:
        return len(self.index) if self.index is not None else len(self.records)

    def summary(self) -> str:
        """One line: records loaded, per modality, skipped with reasons."""
        modalities = ", ".join(f"{name} {n}" for name, n in sorted(self.per_modality.items()))
        line = f"{self.path}: {self.num_records} records loaded ({modalities or 'none'})"
        if self.skipped:
            reasons = ", ".join(f"{n} {reason}" for reason, n in self.skipped.most_common())
            line += f"; skipped {sum(self.skipped.values())} bad record(s): {reasons}"
        return line


def media_fields_for(encoder_modalities) -> set[str]:
    """Record fields a model with encoders for these modalities ('visual', 'audio', ...) accepts."""
    modalities = {modality_from_name(name) for name in encoder_modalities}
    return {record_field for modality, record_field in PLACEHOLDERS.values() if modality in modalities}


@dataclass
class LengthLimit:
    """Each record's tokenised length (template and text, each media item as the tokens it becomes)
    against a context limit: what training reports as 'longer than context', found without training."""

    max_length: int
    tokenizer: Any
    media_tokens: dict[str, int]          # media field -> sequence positions per item
    template: str = "auto"
    system_prompt: str | None = None

    def __post_init__(self):
        from mllm.data.processor import add_placeholder_tokens

        ids = add_placeholder_tokens(self.tokenizer)   # each placeholder one token, as the model has it
        self._per_token = {ids[MEDIA_FIELDS[name]]: count for name, count in self.media_tokens.items()}

    def length(self, record: Record) -> int:
        tokens = tokenize_conversation(self.tokenizer, record.messages, self.template,
                                       record_id=f"'{record.id}' ({record.where})", system_prompt=self.system_prompt)
        return sum(self._per_token.get(token, 1) for token in tokens.input_ids)

    def check(self, record: Record) -> None:
        here = f"{record.where}: record '{record.id}'"
        missing = sorted(set(record.media) - set(self.media_tokens))
        if missing:
            raise RecordError(here, f"has '{missing[0]}' media but no token count for it was given",
                              "unsupported modality")
        try:
            length = self.length(record)
        except LabelAlignmentError as e:
            raise RecordError(here, str(e), "LabelAlignmentError") from None   # named as training names it
        if length > self.max_length:
            raise RecordError(here, f"is {length} tokens long (media expanded) but the context is "
                                    f"{self.max_length}", "longer than context")


def check_data(path: str, *, media_root: str | None = None, media_fields: set[str] | None = None,
               on_bad_sample: str = "error", decode: bool = False, loaders: dict | None = None,
               index: bool = False, length_limit: LengthLimit | None = None) -> DataReport:
    """Validate every record of ``path``; ``media_fields``: the fields the model can take (None:
    all); ``decode``: also open every media file (slower; training finds undecodable ones when
    their batch is drawn), with ``loaders`` (field -> ``(path, record_id) -> item``, e.g. a media
    processor's ``load_item``s, which also preprocess) where given; ``index``: keep where each
    usable record lies (``report.index``, for the lazy dataset) instead of the records;
    ``length_limit``: also tokenise each record and flag those longer than the context. Raises the
    first problem's RecordError under 'error'; counts each bad record once under 'skip'."""
    report = DataReport(path, index=RecordIndex(path) if index else None)
    for span in iter_record_spans(path):
        try:
            # Unknown media fields first: a typo'd `images` also leaves its placeholder unmatched,
            # and the typo is the problem to name.
            _check_fields(span.where, span.raw)
            record = parse_record(span.where, span.raw)
            _check_media(record, media_root, media_fields)
            if decode:
                _decode_media(record, media_root, loaders)
            if length_limit is not None:
                length_limit.check(record)
        except RecordError as e:
            if on_bad_sample != "skip":
                raise
            report.skipped[e.reason] += 1
            report.examples.setdefault(e.reason, str(e))
            continue
        report.per_modality.update(record.media.keys() or ["text-only"])
        if report.index is not None:
            report.index.add(span, record)
        else:
            report.records.append(record)
    return report


def _check_fields(where: str, raw) -> None:
    if not isinstance(raw, dict):
        return   # parse_record names what is wrong with it
    record_id = raw.get("id", "?")
    for key, value in raw.items():
        if key in ("id", "conversations", *MEDIA_FIELDS):
            continue
        suggestion = _media_field_named_like(key)
        paths = [value] if isinstance(value, str) else value if isinstance(value, list) else []
        holds_media = bool(paths) and all(isinstance(p, str) and os.path.splitext(p)[1].lower() in MEDIA_EXTENSIONS
                                          for p in paths)
        if holds_media or (suggestion and paths):
            hint = f" (did you mean '{suggestion}'?)" if suggestion else ""
            raise RecordError(f"{where}: record '{record_id}'",
                              f"unknown media field '{key}'{hint}; media fields are {', '.join(MEDIA_FIELDS)}",
                              "unknown media field")


def _media_field_named_like(key: str) -> str | None:
    """The media field ``key`` is a plural, path-suffixed or one-letter-off spelling of, if any."""
    name = key.lower()
    for media_field in MEDIA_FIELDS:
        if name in (f"{media_field}s", f"{media_field}_path", f"{media_field}_paths", f"{media_field}_file",
                    f"{media_field}_files", f"{media_field}s_path", media_field):
            return media_field
    close = difflib.get_close_matches(name, MEDIA_FIELDS, n=1, cutoff=0.8)
    if close and abs(len(close[0]) - len(name)) <= 1:
        return close[0]
    return None


def _check_media(record: Record, media_root: str | None, media_fields: set[str] | None) -> None:
    here = f"{record.where}: record '{record.id}'"
    for media_field, paths in record.media.items():
        if media_fields is not None and media_field not in media_fields:
            raise RecordError(here, f"has '{media_field}' media but the model has no encoder for it",
                              "unsupported modality")
        for path in paths:
            resolved = resolve_media_path(path, media_root)
            if not os.path.isfile(resolved):
                root = f" (media_root {media_root})" if media_root and not os.path.isabs(path) else ""
                raise RecordError(here, f"'{media_field}' file not found: {resolved}{root}", "missing media file")


def _decode_media(record: Record, media_root: str | None, loaders: dict | None) -> None:
    """Open each media file as training will (an image, a video's first frame, an audio track;
    or what ``loaders`` do with it)."""
    from mllm.data.media import MediaError, load_audio, load_image, load_video_frames

    loaders = loaders or {"image": load_image, "video": lambda p, rid: load_video_frames(p, 1, rid),
                          "audio": lambda p, rid: load_audio(p, record_id=rid),
                          "speech": lambda p, rid: load_audio(p, record_id=rid)}
    for media_field, paths in record.media.items():
        for path in paths:
            try:
                loaders[media_field](resolve_media_path(path, media_root), record.id)
            except MediaError as e:
                raise RecordError(f"{record.where}: record '{record.id}'", f"'{media_field}' file unreadable: {e}",
                                  "unreadable media file") from None
