"""MokA's released stage-2 files (huggingface.co/yake0409/MokA_AudioVisualText), rendered with
MokA's instruction wording, the same user turn that ``mllm eval --option protocol=moka`` builds.

Expected tree (MokA's README_AVT; media are the original projects' videos plus ``.mp3`` tracks
the user extracts)::

    MUSIC_AVQA_data/train_samples_with_reasoning_avqa.json, video_data/<video_id>.mp4, audio_data/<video_id>.mp3
    AVE_data/train_samples_ave.json, converted_label/<vid>.txt, AVE/<vid>.mp4, audio_data/<vid>.mp3

The MUSIC-AVQA JSON's own ``video_path`` / ``audio_path`` hold the authors' machine paths, so
media are found from templates instead (``video_path="{video_path}"`` uses the field as is).
"""

from __future__ import annotations

import os
from typing import Iterator

from mllm.data.schema import RecordError
from mllm.data.sources import register_source
from mllm.data.sources.base import Located, Source, conversation, json_list, media_path, require_fields

# MokA's unified_dataset.py wording (the eval suites' protocol=moka uses the same strings).
MOKA_AVQA_QUESTION_PREFIX = "Please answer this question: "
MOKA_AVE_INSTRUCTION = "Please describe the events and time range that occurred in the video."
AV_PLACEHOLDERS = "<video>\n<audio>\n"

AVQA_FIELDS = ("video_id", "question_id", "type", "question", "answer", "label")
AVE_FIELDS = ("event", "vid", "start_time", "end_time")


@register_source
class MusicAvqaMoka(Source):
    name = "music_avqa_moka"
    summary = ("MokA's MUSIC-AVQA JSON (train_samples_with_reasoning_avqa.json / test_samples_avqa.json): "
               "question -> reasoning label ending in <answer> X </answer>")

    def __init__(self, video_path: str = "video_data/{video_id}.mp4", audio_path: str = "audio_data/{video_id}.mp3",
                 target: str = "label"):
        if target not in ("label", "answer"):
            raise ValueError(f"music_avqa_moka option target must be 'label' (MokA's training target) or "
                             f"'answer', got {target!r}")
        self.video_path, self.audio_path, self.target = video_path, audio_path, target

    def read(self, path: str) -> Iterator[Located]:
        for where, item in json_list(path):
            require_fields(where, item, AVQA_FIELDS if self.target == "label" else AVQA_FIELDS[:-1])
            question_type = item["type"]
            if not (isinstance(question_type, list) and len(question_type) == 2):
                raise RecordError(where, f"'type' must be a 2-item list such as ['Audio', 'Counting'], "
                                         f"got {question_type!r}")
            record = {
                "id": str(item["question_id"]),
                "video": media_path(self.video_path, where, item, "video_path"),
                "audio": media_path(self.audio_path, where, item, "audio_path"),
                "conversations": conversation(AV_PLACEHOLDERS + MOKA_AVQA_QUESTION_PREFIX + str(item["question"]),
                                              str(item[self.target])),
                "answer": str(item["answer"]), "question_type": question_type, "video_id": str(item["video_id"]),
            }
            yield where, record


@register_source
class AveMoka(Source):
    name = "ave_moka"
    summary = ("MokA's AVE JSON (train_samples_ave.json) of {event, vid, start_time, end_time}; the target is "
               "the whole converted_label/<vid>.txt")

    def __init__(self, video_path: str = "AVE/{vid}.mp4", audio_path: str = "audio_data/{vid}.mp3",
                 label_dir: str = "converted_label"):
        self.video_path, self.audio_path, self.label_dir = video_path, audio_path, label_dir

    def read(self, path: str) -> Iterator[Located]:
        # Label files sit beside the JSON (AVE_data/converted_label/) unless label_dir is absolute.
        label_dir = os.path.join(os.path.dirname(os.path.abspath(path)), self.label_dir)
        for where, item in json_list(path):
            require_fields(where, item, AVE_FIELDS)
            label_path = os.path.join(label_dir, f"{item['vid']}.txt")
            try:
                with open(label_path, encoding="utf-8") as f:
                    label = f.read().strip()
            except FileNotFoundError:
                raise RecordError(where, f"record '{item['vid']}': label file {label_path} not found "
                                         f"(option label_dir={self.label_dir!r})") from None
            if not label:
                raise RecordError(where, f"record '{item['vid']}': label file {label_path} is empty")
            yield where, {
                "id": str(item["vid"]),
                "video": media_path(self.video_path, where, item, "video_path"),
                "audio": media_path(self.audio_path, where, item, "audio_path"),
                "conversations": conversation(AV_PLACEHOLDERS + MOKA_AVE_INSTRUCTION, label),
                "event": item["event"], "start_time": item["start_time"], "end_time": item["end_time"],
            }
