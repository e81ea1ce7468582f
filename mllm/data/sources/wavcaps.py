"""WavCaps (huggingface.co/datasets/cvssp/WavCaps) JSON: ``{"num_captions_per_audio": 1, "data":
[{id, caption, duration, audio, ...}]}``. Audio is FLAC: AudioSet_SL ids end in ``.wav``
(``Y<ytid>.wav`` -> ``Y<ytid>.flac``), other sources' are ``<id>.flac``. ``blacklist`` names
WavCaps' blacklist JSONs (``{"AudioSet": [...], "FreeSound": [...], ...}``): listed ids are left out
(apply them before evaluating on AudioCaps / Clotho)."""

from __future__ import annotations

import os
from typing import Iterator

from mllm.data.schema import RecordError
from mllm.data.sources import register_source
from mllm.data.sources.audiocaps import MOKA_AUDIO_PROMPT
from mllm.data.sources.base import Located, Source, conversation, read_json, require_fields


def audio_file_name(item_id: str) -> str:
    stem = item_id[:-4] if item_id.endswith(".wav") else item_id
    return f"{stem}.flac"


def _blacklisted_ids(paths: list[str]) -> set[str]:
    ids = set()
    for path in paths:
        raw = read_json(path)
        if not isinstance(raw, dict):
            raise RecordError(path, "a WavCaps blacklist is an object of {source: [ids]}")
        for names in raw.values():
            ids.update(os.path.splitext(str(n))[0] for n in names)
    return ids


@register_source
class WavCaps(Source):
    name = "wavcaps"
    summary = "WavCaps JSON ({num_captions_per_audio, data: [{id, caption, duration, ...}]}), FLAC audio"

    def __init__(self, audio_dir: str = "", prompt: str = MOKA_AUDIO_PROMPT, blacklist: list[str] | str | None = None):
        self.audio_dir, self.prompt = audio_dir.rstrip("/"), prompt
        self.blacklist = [blacklist] if isinstance(blacklist, str) else list(blacklist or [])

    def read(self, path: str) -> Iterator[Located]:
        raw = read_json(path)
        if not isinstance(raw, dict) or not isinstance(raw.get("data"), list):
            raise RecordError(path, "expected WavCaps' layout {\"num_captions_per_audio\": 1, \"data\": [...]}")
        skip = _blacklisted_ids(self.blacklist)
        for index, item in enumerate(raw["data"]):
            where = f"{path}: data[{index}]"
            require_fields(where, item, ("id", "caption"))
            item_id = str(item["id"])
            if os.path.splitext(item_id)[0] in skip:
                continue
            name = audio_file_name(item_id)
            record = {"id": item_id, "audio": f"{self.audio_dir}/{name}" if self.audio_dir else name,
                      "conversations": conversation(f"<audio>\n{self.prompt}", str(item["caption"]).strip())}
            if "duration" in item:
                record["duration"] = item["duration"]
            yield where, record
