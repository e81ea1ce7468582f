"""Training samples read and tokenised when drawn, not up front (``data.lazy: true``, the default).

The eager :class:`~mllm.data.dataset.MultimodalDataset` tokenises every record before step one
and holds the token lists in memory: minutes and gigabytes for LLaVA's 665K records. This
dataset keeps only a :class:`~mllm.data.record_index.RecordIndex` (byte span and a few numbers
per record, built by the pre-flight check's single pass) and, for sample ``i``, reads record
``i`` from the file, tokenises it exactly as the eager dataset does and loads its media: the same
tensors, index for index, when no record is bad.

Bad records. Problems the pre-flight pass finds (JSON, turns, placeholder counts, unknown media
fields, missing files) are skipped and counted up front as before. Those that only tokenising or
decoding shows (longer than the context, answer lost to truncation, unreadable media) are found
when the record is drawn: under ``on_bad_sample: error`` the error names the file, line and
record; under ``skip`` the next good record stands in (so batches keep their size) and the record
is marked bad in a small shared-memory array, so it is counted once and never read again, across
epochs and DataLoader workers alike. The counts are complete once every record has been drawn
(after the first epoch) and are logged at the end of the run.

Lengths for ``group_by_modality_length`` are estimated, as LLaVA does, without tokenising: a
least-squares fit of token count on characters and turns over an evenly spaced sample of
records (tokenised exactly), plus each record's media tokens. The estimate depends on the file
and the tokenizer alone, so the order stays deterministic and resumable.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from typing import Any

import numpy as np
import torch

from mllm.data.check import DataReport
from mllm.data.dataset import MediaSpec, MultimodalDataset
from mllm.data.media import AUDIO_FIELDS, MediaError, report_audio_conversions
from mllm.data.record_index import index_records
from mllm.data.schema import RecordError
from mllm.data.templates import LabelAlignmentError

logger = logging.getLogger(__name__)

#: Records tokenised to fit the length estimate.
CALIBRATION_RECORDS = 256

_MEDIA_REASON = "unreadable media file"


class LazyMultimodalDataset(MultimodalDataset):
    """:class:`MultimodalDataset` over a record index: each sample is read, tokenised and its media
    loaded when drawn. ``report``: the pre-flight check made with ``index=True`` (used, not redone)."""

    def __init__(self, path: str, tokenizer, media_specs: dict[str, MediaSpec], *, template: str = "auto",
                 system_prompt: str | None = None, max_length: int | None = None, media_root: str | None = None,
                 on_bad_sample: str = "error", for_generation: bool = False, progress: bool = True,
                 report: DataReport | None = None):
        self.path = path
        self.media_root = media_root
        self.on_bad_sample = on_bad_sample
        self.for_generation = for_generation
        self.specs_by_field = {spec.field: spec for spec in media_specs.values()}
        self._specs_by_token = {spec.token_id: spec for spec in media_specs.values()}
        self._tokenise_args = (tokenizer, self._specs_by_token, template, system_prompt, max_length)
        if report is not None and report.index is not None:
            self.index, self.skipped_up_front = report.index, Counter(report.skipped)
        else:   # as the eager dataset without a report: records validated, media not looked at
            self.index, self.skipped_up_front = index_records(path, on_bad_sample)
            if self.skipped_up_front:
                logger.warning("%s: skipped %d bad record(s): %s", path, sum(self.skipped_up_front.values()),
                               dict(self.skipped_up_front))
        if not len(self.index):
            raise ValueError(f"{path}: no usable records")
        # Shared with DataLoader workers (fork and spawn alike): bad records found in any process.
        # Per record: 0 not known to be bad, else 1 + the position of its reason in _reasons.
        self._bad = torch.zeros(len(self.index), dtype=torch.uint8).share_memory_()
        # Reasons as the eager dataset names them (a RecordError's reason, else the error's type).
        self._reasons = (_MEDIA_REASON, "longer than context", "unsupported modality", "LabelAlignmentError",
                         "ValueError", "malformed record", "other")
        self.media_skipped: Counter = Counter()   # this process: unreadable file -> records skipped
        self._lengths: list[int] | None = None
        audio_columns = [self.index.FIELDS.index(f) for f in AUDIO_FIELDS]
        audio_records = np.flatnonzero(self.index.media_counts[:, audio_columns].sum(axis=1))
        self.audio_conversions = report_audio_conversions(
            path, (self.index.read(int(i)).media for i in audio_records),
            {f: spec.max_seconds for f, spec in self.specs_by_field.items()}, media_root)

    def __len__(self) -> int:
        return len(self.index)

    # ------------------------------------------------------------------ one record
    def _row(self, position: int) -> dict:
        """Record ``position`` read, validated and tokenised (the eager dataset's stored row)."""
        return self._tokenise(self.index.read(position), *self._tokenise_args)

    def record(self, index: int) -> dict[str, Any]:
        row = self._row(index)
        row["extra"] = json.loads(row["extra"])
        return row

    def _mark_bad(self, position: int, reason: str) -> None:
        if reason not in self._reasons:
            reason = "other"
        self._bad[position] = 1 + self._reasons.index(reason)

    def __getitem__(self, index: int) -> dict[str, Any]:
        for attempt in range(len(self)):
            position = (index + attempt) % len(self)
            if self._bad[position]:
                continue
            try:
                row = self._row(position)
                media = self._load_media(row)
                break
            except MediaError as e:
                if self.on_bad_sample != "skip":
                    raise
                self._mark_bad(position, _MEDIA_REASON)
                self.media_skipped[str(e.path)] += 1
                logger.warning("skipping unreadable media: %s", e)
            except (RecordError, LabelAlignmentError, ValueError) as e:
                if self.on_bad_sample != "skip":
                    raise
                self._mark_bad(position, getattr(e, "reason", type(e).__name__))
                logger.warning("skipping bad record: %s", e)
        else:
            raise MediaError(self.path, "no sample is usable")
        return {"input_ids": torch.tensor(row["input_ids"]), "labels": torch.tensor(row["labels"]),
                "question_mask": torch.tensor(row["question_mask"], dtype=torch.bool), **media}

    # ------------------------------------------------------------------ counts
    @property
    def skipped(self) -> Counter:
        """Bad records by reason: the pre-flight's, and those found when drawn (unreadable media
        apart, as in the eager dataset's ``media_skipped``)."""
        found = Counter(self._bad.tolist())
        counts = Counter(self.skipped_up_front)
        for code, n in found.items():
            if code and self._reasons[code - 1] != _MEDIA_REASON:
                counts[self._reasons[code - 1]] += n
        return counts

    @property
    def num_skipped(self) -> int:
        return sum(self.skipped_up_front.values()) + int((self._bad > 0).sum())

    # ------------------------------------------------------------------ lengths for the sampler
    def lengths_and_mixes(self) -> tuple[list[int], list[tuple[str, ...]]]:
        """Estimated token counts (no record tokenised but a fixed sample) and modality mixes."""
        if self._lengths is None:
            self._lengths = self._estimated_lengths()
        return self._lengths, self.index.mixes()

    def _estimated_lengths(self) -> list[int]:
        chars = self.index.chars.astype(np.float64)
        turns = self.index.turns.astype(np.float64)
        media_tokens = self.index.media_counts @ np.array(
            [self.specs_by_field[f].num_tokens if f in self.specs_by_field else 0 for f in self.index.FIELDS])
        sample = np.unique(np.linspace(0, len(self) - 1, min(CALIBRATION_RECORDS, len(self))).astype(int))
        features, targets = [], []
        for position in sample.tolist():
            try:
                length = len(self._row(position)["input_ids"])
            except (RecordError, LabelAlignmentError, ValueError, MediaError):
                continue
            features.append((chars[position], turns[position], 1.0))
            targets.append(length - media_tokens[position])
        if features:
            coef = np.linalg.lstsq(np.array(features), np.array(targets, dtype=np.float64), rcond=None)[0]
        else:
            coef = np.array([0.25, 0.0, 0.0])   # about four characters a token
        text_tokens = np.rint(np.column_stack([chars, turns, np.ones_like(chars)]) @ coef)
        return np.maximum(1, text_tokens + media_tokens).astype(int).tolist()
