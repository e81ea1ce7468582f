"""Clotho (v2.1, Zenodo 4783391) captions: ``clotho_captions_<split>.csv`` with ``file_name,
caption_1 ... caption_5``; audio ``<split>/<file_name>`` (names contain spaces). Each clip gives
five records, one per caption, ids ``<file_name>#<k>``."""

from __future__ import annotations

from typing import Iterator

from mllm.data.schema import RecordError
from mllm.data.sources import register_source
from mllm.data.sources.audiocaps import MOKA_AUDIO_PROMPT
from mllm.data.sources.base import Located, Source, conversation, csv_rows

CAPTION_COLUMNS = tuple(f"caption_{k}" for k in range(1, 6))


@register_source
class Clotho(Source):
    name = "clotho"
    summary = "Clotho captions CSV (file_name, caption_1..caption_5): five records per clip"

    def __init__(self, audio_dir: str = "", prompt: str = MOKA_AUDIO_PROMPT):
        self.audio_dir, self.prompt = audio_dir.rstrip("/"), prompt

    def read(self, path: str) -> Iterator[Located]:
        for where, row in csv_rows(path, ("file_name", *CAPTION_COLUMNS)):
            name = row["file_name"]
            if not name:
                raise RecordError(where, "empty file_name")
            audio = f"{self.audio_dir}/{name}" if self.audio_dir else name
            for k, column in enumerate(CAPTION_COLUMNS, start=1):
                caption = (row[column] or "").strip()
                if not caption:
                    raise RecordError(where, f"'{name}': {column} is empty")
                yield where, {"id": f"{name}#{k}", "audio": audio,
                              "conversations": conversation(f"<audio>\n{self.prompt}", caption)}
