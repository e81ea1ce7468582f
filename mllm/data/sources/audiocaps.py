"""AudioCaps captions: the official CSVs (cdjkim/audiocaps ``dataset/{train,val,test}.csv``, header
``audiocap_id,youtube_id,start_time,caption``) and MokA's ``AudioCaps/train.json`` / ``val.json``
(a list of ``{audiocap_id, start_time, caption}``).

Audio is not distributed; MokA names each clip ``<audiocap_id>.wav`` (so each of a val clip's five
captions needs its own file), the default here. Downloads named by YouTube id take
``audio_path="{youtube_id}_{start_time}.wav"`` or similar (CSV only: the JSON has no youtube_id).
"""

from __future__ import annotations

from typing import Iterator

from mllm.data.sources import register_source
from mllm.data.sources.base import Located, Source, conversation, csv_rows, json_list, media_path, require_fields

MOKA_AUDIO_PROMPT = "Please describe this audio."   # MokA's pretrain_dataset.py
FIELDS = ("audiocap_id", "start_time", "caption")


@register_source
class AudioCaps(Source):
    name = "audiocaps"
    summary = "AudioCaps captions: official CSV (audiocap_id,youtube_id,start_time,caption) or MokA's train/val.json"

    def __init__(self, audio_path: str = "{audiocap_id}.wav", prompt: str = MOKA_AUDIO_PROMPT):
        self.audio_path, self.prompt = audio_path, prompt

    def read(self, path: str) -> Iterator[Located]:
        rows = csv_rows(path, FIELDS) if path.lower().endswith(".csv") else json_list(path)
        for where, item in rows:
            require_fields(where, item, FIELDS)
            values = {k: str(v) for k, v in item.items()}
            yield where, {"id": values["audiocap_id"],
                          "audio": media_path(self.audio_path, where, values, "audio_path"),
                          "conversations": conversation(f"<audio>\n{self.prompt}", values["caption"].strip()),
                          "start_time": item["start_time"]}
