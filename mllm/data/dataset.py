"""Tokenised multimodal samples for training and generation, and their collator.

Records are validated and tokenised once, up front (cheap: no media is decoded), and kept in
a ``datasets.Dataset``; media files are decoded lazily in ``__getitem__`` (in DataLoader
workers when ``dataloader_num_workers`` > 0).
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable

import datasets
import torch
from tqdm.auto import tqdm

from mllm.data.check import DataReport
from mllm.data.media import MediaError, report_audio_conversions, resolve_media_path
from mllm.data.schema import Record, RecordError, read_records
from mllm.data.templates import IGNORE_INDEX, LabelAlignmentError, tokenize_conversation
from mllm.modality import MEDIA_INPUT_KEYS

logger = logging.getLogger(__name__)


@dataclass
class MediaSpec:
    """What the data pipeline needs to know about one placeholder kind (built by the model)."""

    placeholder: str                        # "<image>"
    field: str                              # record field: "image"
    token_id: int                           # placeholder token id
    num_tokens: int                         # sequence positions per item
    load_item: Callable[[str, str], torch.Tensor]  # (path, record_id) -> preprocessed tensor
    max_seconds: float | None = None        # audio / speech: longer clips are trimmed to this
    # Media whose token count depends on the item (a native backbone's processor, mllm.model.native):
    # (path, record_id) -> the ids its placeholder becomes. load_item then returns a dict of
    # tensors that are concatenated over the record's items (and over the batch).
    item_tokens: Callable[[str, str], list[int]] | None = None


#: Batch keys of native backbones' processors (mllm.model.native), concatenated like media.
NATIVE_MEDIA_KEYS = ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw", "second_per_grid_ts")


class SampleTooLongError(RecordError):
    pass


def expand_placeholders(input_ids: list[int], labels: list[int], question_mask: list[bool],
                        specs: dict[int, MediaSpec], item_tokens: dict[int, list[list[int]]] | None = None,
                        ) -> tuple[list[int], list[int], list[bool]]:
    """Replace each placeholder token by ``num_tokens`` copies of itself (never labelled), or,
    for a placeholder in ``item_tokens``, by its next item's ids."""
    out_ids, out_labels, out_question = [], [], []
    per_item = {token: iter(items) for token, items in (item_tokens or {}).items()}
    for token, label, question in zip(input_ids, labels, question_mask):
        spec = specs.get(token)
        if spec is None:
            out_ids.append(token), out_labels.append(label), out_question.append(question)
        else:
            ids = next(per_item[token], []) if token in per_item else [token] * spec.num_tokens
            out_ids.extend(ids)
            out_labels.extend([IGNORE_INDEX] * len(ids))
            out_question.extend([False] * len(ids))
    return out_ids, out_labels, out_question


class MultimodalDataset(torch.utils.data.Dataset):
    """Samples of ``input_ids``, ``labels``, ``question_mask`` and ``<field>_inputs`` tensors.

    ``for_generation=True`` builds prompts (up to the generation prompt) and keeps each
    record's reference answer (its last assistant turn, or an ``answer`` field) for scoring.
    """

    def __init__(self, path: str, tokenizer, media_specs: dict[str, MediaSpec], *, template: str = "auto",
                 system_prompt: str | None = None, max_length: int | None = None, media_root: str | None = None,
                 on_bad_sample: str = "error", for_generation: bool = False, progress: bool = True,
                 report: DataReport | None = None):
        """``report``: this file's pre-flight check (``mllm.data.check.check_data``); its records
        are used (not read again) and its skip counts carried on."""
        self.path = path
        self.media_root = media_root
        self.on_bad_sample = on_bad_sample
        self.for_generation = for_generation
        self.specs_by_field = {spec.field: spec for spec in media_specs.values()}
        specs_by_token = {spec.token_id: spec for spec in media_specs.values()}
        if report is not None:
            records, self.skipped = report.records, Counter(report.skipped)
        else:
            records, self.skipped = read_records(path, on_bad_sample)
        rows, unusable = [], Counter()
        for record in tqdm(records, desc=f"tokenising {path}", disable=not progress, leave=False):
            try:
                rows.append(self._tokenise(record, tokenizer, specs_by_token, template, system_prompt, max_length))
            except (RecordError, LabelAlignmentError, ValueError) as e:
                if on_bad_sample != "skip":
                    raise
                unusable[getattr(e, "reason", type(e).__name__)] += 1
        self.skipped.update(unusable)
        # The pre-flight report has said what it skipped; say only what tokenising added.
        newly_skipped = unusable if report is not None else self.skipped
        if newly_skipped:
            logger.warning("%s: skipped %d bad record(s): %s", path, sum(newly_skipped.values()),
                           dict(newly_skipped))
        if not rows:
            raise ValueError(f"{path}: no usable records")
        self.data = datasets.Dataset.from_list(rows)
        # Said once, up front: files converted to mono 16 kHz, clips longer than the encoder takes.
        self.audio_conversions = report_audio_conversions(
            path, (json.loads(row["media"]) for row in rows),
            {f: spec.max_seconds for f, spec in self.specs_by_field.items()}, media_root)
        self.media_skipped: Counter = Counter()   # unreadable media file -> records skipped for it
        self._unreadable_rows: set[int] = set()   # found bad once: never read again (each epoch)

    def _tokenise(self, record: Record, tokenizer, specs_by_token, template, system_prompt, max_length) -> dict:
        here = f"{record.where}: record '{record.id}'"
        for media_field in record.media:
            if media_field not in self.specs_by_field:
                raise RecordError(here, f"has '{media_field}' media but the model has no encoder for it",
                                  "unsupported modality")
        tokens = tokenize_conversation(tokenizer, record.messages, template,
                                       record_id=f"'{record.id}' ({record.where})",
                                       for_generation=self.for_generation, system_prompt=system_prompt)
        item_tokens = {spec.token_id: [spec.item_tokens(resolve_media_path(p, self.media_root), here)
                                       for p in record.media.get(spec.field, [])]
                       for spec in self.specs_by_field.values() if spec.item_tokens is not None}
        input_ids, labels, question = expand_placeholders(tokens.input_ids, tokens.labels,
                                                          tokens.question_mask, specs_by_token, item_tokens)
        if max_length is not None and len(input_ids) > max_length:
            raise SampleTooLongError(here, f"is {len(input_ids)} tokens long (media expanded) but the context "
                                           f"is {max_length}; shorten it or raise data.max_length",
                                     "longer than context")
        answer = record.extra.get("answer")
        if answer is None and record.messages[-1]["role"] == "assistant":
            answer = record.messages[-1]["content"]
        return {"id": record.id, "where": record.where, "input_ids": input_ids, "labels": labels,
                "question_mask": question, "media": json.dumps(record.media),
                "answer": answer, "extra": json.dumps(record.extra)}

    def __len__(self) -> int:
        return len(self.data)

    def lengths_and_mixes(self) -> tuple[list[int], list[tuple[str, ...]]]:
        """Each sample's token count (media expanded) and its modality mix (sorted media fields), for
        :class:`mllm.data.sampler.ModalityLengthGroupedSampler`; read from the stored rows, no media."""
        lengths = [len(ids) for ids in self.data["input_ids"]]
        mixes = [tuple(sorted(json.loads(media))) for media in self.data["media"]]
        return lengths, mixes

    def record(self, index: int) -> dict[str, Any]:
        """The stored row with its id, answer and extra fields (for scoring)."""
        row = dict(self.data[index])
        row["extra"] = json.loads(row["extra"])
        return row

    def _load_media(self, row: dict) -> dict[str, torch.Tensor]:
        here = f"{row['where']}: record '{row['id']}'"
        loaded = {}
        for media_field, paths in json.loads(row["media"]).items():
            spec = self.specs_by_field[media_field]
            items = [spec.load_item(resolve_media_path(p, self.media_root), here) for p in paths]
            if isinstance(items[0], dict):  # a native processor's outputs (MediaSpec.item_tokens)
                loaded.update({key: torch.cat([item[key] for item in items]) for key in items[0]})
            else:
                loaded[MEDIA_INPUT_KEYS[media_field]] = torch.stack(items)
        return loaded

    @property
    def num_skipped(self) -> int:
        """Bad records so far, each counted once: malformed or unusable ones, and unreadable media."""
        return sum(self.skipped.values()) + len(self._unreadable_rows)

    def __getitem__(self, index: int) -> dict[str, Any]:
        for attempt in range(len(self)):
            position = (index + attempt) % len(self)
            if position in self._unreadable_rows:
                continue
            row = self.data[position]
            try:
                media = self._load_media(row)
                break
            except MediaError as e:
                if self.on_bad_sample != "skip":
                    raise
                # Skip and count once: substitute the next sample so the batch keeps its size.
                self._unreadable_rows.add(position)
                self.media_skipped[str(e.path)] += 1
                logger.warning("skipping unreadable media: %s", e)
        else:
            raise MediaError(self.path, "no sample has readable media")
        return {"input_ids": torch.tensor(row["input_ids"]), "labels": torch.tensor(row["labels"]),
                "question_mask": torch.tensor(row["question_mask"], dtype=torch.bool), **media}


class MultimodalCollator:
    """Pads ``input_ids`` / ``labels`` / ``question_mask`` and concatenates each media key over
    the batch in sample order (the order the model splices them in). Right padding for
    training, left padding for generation."""

    def __init__(self, pad_token_id: int, padding_side: str = "right"):
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        self.pad_token_id = pad_token_id
        self.padding_side = padding_side

    def _pad(self, rows: list[torch.Tensor], value) -> torch.Tensor:
        length = max(len(r) for r in rows)
        out = torch.full((len(rows), length), value, dtype=rows[0].dtype)
        for i, r in enumerate(rows):
            if self.padding_side == "right":
                out[i, : len(r)] = r
            else:
                out[i, length - len(r):] = r
        return out

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        ids = [f["input_ids"] for f in features]
        batch = {
            "input_ids": self._pad(ids, self.pad_token_id),
            "attention_mask": self._pad([torch.ones_like(r) for r in ids], 0),
            "question_mask": self._pad([f["question_mask"] for f in features], False),
        }
        if all("labels" in f for f in features):
            batch["labels"] = self._pad([f["labels"] for f in features], IGNORE_INDEX)
        for key in (*MEDIA_INPUT_KEYS.values(), *NATIVE_MEDIA_KEYS):
            items = [f[key] for f in features if key in f]
            if items:
                batch[key] = torch.cat(items)
        return batch
