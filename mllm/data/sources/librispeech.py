"""LibriSpeech (OpenSLR SLR12) as ASR records. ``path`` is any folder of the tree
``LibriSpeech/<subset>/<speaker>/<chapter>/``: every ``<speaker>-<chapter>.trans.txt`` below it
lists ``<utt_id> <TRANSCRIPT>`` lines for the ``<utt_id>.flac`` files beside it. Media paths are
relative to ``path`` (``media_root`` defaults to it)."""

from __future__ import annotations

import os
from typing import Iterator

from mllm.data.schema import RecordError
from mllm.data.sources import register_source
from mllm.data.sources.base import Located, Source, conversation

ASR_PROMPT = "Transcribe the speech."   # the project's synthetic speech data uses the same wording
CASES = ("original", "lower", "sentence")


@register_source
class LibriSpeech(Source):
    name = "librispeech"
    summary = "LibriSpeech folder tree (<speaker>/<chapter>/*.trans.txt beside .flac) as ASR records"
    media_root_is_path = True   # media paths are relative to the folder read

    def __init__(self, field: str = "speech", prompt: str = ASR_PROMPT, case: str = "original"):
        if field not in ("speech", "audio"):
            raise ValueError(f"librispeech option field must be 'speech' or 'audio', got {field!r}")
        if case not in CASES:
            raise ValueError(f"librispeech option case must be one of {CASES}, got {case!r}")
        self.field, self.prompt, self.case = field, prompt, case

    def _text(self, transcript: str) -> str:
        if self.case == "lower":
            return transcript.lower()
        if self.case == "sentence":  # as SALMONN's annotations re-case the upper-case transcripts
            return transcript[:1].upper() + transcript[1:].lower()
        return transcript

    def read(self, path: str) -> Iterator[Located]:
        if not os.path.isdir(path):
            raise RecordError(path, "librispeech reads a folder (a subset such as train-clean-100, or LibriSpeech/)")
        found = False
        for folder, dirs, files in sorted(os.walk(path)):
            dirs.sort()
            for name in sorted(f for f in files if f.endswith(".trans.txt")):
                found = True
                transcript_path = os.path.join(folder, name)
                with open(transcript_path, encoding="utf-8") as f:
                    lines = f.read().splitlines()
                for lineno, line in enumerate(lines, start=1):
                    if not line.strip():
                        continue
                    where = f"{transcript_path}:{lineno}"
                    utt_id, _, transcript = line.strip().partition(" ")
                    if not transcript.strip():
                        raise RecordError(where, f"utterance {utt_id!r} has no transcript")
                    audio = os.path.relpath(os.path.join(folder, f"{utt_id}.flac"), path)
                    yield where, {"id": utt_id, self.field: audio,
                                  "conversations": conversation(f"<{self.field}>\n{self.prompt}",
                                                                self._text(transcript.strip()))}
        if not found:
            raise RecordError(path, "no *.trans.txt transcript files below this folder")
