"""AVE: audio-visual event localisation, scored per one-second segment (ten per video).

Annotations: ``Annotations.txt`` / ``testSet.txt`` lines ``Category&VideoID&Quality&StartTime&EndTime``
(a leading header line is skipped); 28 event classes, segments outside the event are
background. The model answers ``<event>Name</event><range>start,end</range>`` (one or more
ranges; MokA's fallback ``Name (start end)`` is read too). Media: the video and its audio
(``video_path`` / ``audio_path``, relative to the media root). The event vocabulary is the
categories of the annotation file, or of ``vocabulary_path`` (MokA uses the full
``Annotations.txt``).

The official AVE scorer works on classifier outputs; for generated answers the reference is
MokA's ``ave_eval.py``, which ``official`` reproduces: one ``<event>`` tag; if its lower-cased
text is an event, at least one valid ``<range>s,e</range>`` (bad ranges are ignored), else the
``Name (s e)`` fallback inside the tag; segment i belongs to a range iff ``s <= i <= e``
(inclusive at both ends, for the reference ``start_time``/``end_time`` too, so "6&8" labels
segments 6, 7 and 8). Accuracy is over ten slots per video, filled in order for parsed
answers only: **an unparseable or missing answer leaves ten background-vs-background slots,
which count as correct.**
``strict`` uses AVE's own convention (segments ``start <= i < end``) for the reference and the
predicted ranges, matches event names case-insensitively, and counts all ten segments of an
unparseable or missing answer as wrong.

Prompt and length differ from MokA's inference (``unified_dataset.py`` / ``inference_cut.py``),
which asks "Please describe the events and time range that occurred in the video." and
generates up to 500 new tokens. MokA's models were fine-tuned on AVE training targets written in
the ``<event>``/``<range>`` format, so they need no format instruction. A checkpoint tuned on
other data has never seen that format, so the default prompt spells it out and, since one
short tagged answer is asked for, stops at 48 new tokens. To score a checkpoint trained the
MokA way, use ``protocol="moka"`` (``--option protocol=moka``): MokA's instruction, 500 new
tokens. Its prompt framing ("This is a video: <video_start>...") is tied to MokA's own model
and is not reproduced: the media placeholders are this project's. ``--max-new-tokens`` and
``--prompt-suffix`` still override either protocol.

Options: ``vocabulary_path`` (see above), ``video_path`` / ``audio_path`` (templates with
``{video_id}``, relative to the media root; defaults ``videos/{video_id}.mp4`` and
``audios/{video_id}.wav``), ``protocol`` (``default`` or ``moka``).
"""

from __future__ import annotations

import os
import re

from eval_suites.base import (
    AnnotationError,
    AnnotationFileNotFoundError,
    EvalSample,
    Suite,
    check_media_template,
    check_mode,
    check_option_choice,
    ratio,
    require_fields,
    results_header,
    write_json_lines,
)
from eval_suites.parsing import normalize_text

SEGMENTS = 10
BACKGROUND = "none"
RANGE_TAG = re.compile(r"<range>(.*?)</range>")
PAREN_RANGE = re.compile(r"\(\s*(\d+)\s+(\d+)\s*\)")
PROTOCOLS = ("default", "moka")
MOKA_INSTRUCTION = "Please describe the events and time range that occurred in the video."  # unified_dataset.py
MOKA_MAX_NEW_TOKENS = 500                                                                   # inference_cut.py


def read_annotation_lines(path: str) -> list[dict]:
    try:
        f = open(path, encoding="utf-8")
    except FileNotFoundError:
        raise AnnotationFileNotFoundError(path) from None
    rows = []
    with f:
        for lineno, line in enumerate(f, start=1):
            line = line.strip()
            if not line or (lineno == 1 and line.lower().startswith("category&")):
                continue
            where = f"{path}:{lineno}"
            fields = line.split("&")
            if len(fields) != 5:
                raise AnnotationError(where, "expected 'Category&VideoID&Quality&StartTime&EndTime'")
            try:
                start, end = int(fields[3]), int(fields[4])
            except ValueError:
                raise AnnotationError(where, "start and end times must be whole seconds") from None
            if not 0 <= start < end <= SEGMENTS:
                raise AnnotationError(where, f"event span {start}-{end} is not inside 0-{SEGMENTS} s")
            rows.append({"event": fields[0], "video_id": fields[1], "quality": fields[2], "start": start,
                         "end": end, "where": where})
    return rows


def official_ave_prediction(output: str, events: set[str]) -> tuple[str, list[tuple[int, int]]] | None:
    """MokA's parse: (lower-cased event, ranges) or None when the sample is skipped."""
    tags = re.findall(r"<event>(.*?)</event>", output)
    if len(tags) != 1:
        return None
    content = tags[0].strip()
    if content.lower() in events:
        ranges = []
        for text in RANGE_TAG.findall(output):
            parts = text.strip().split(",")
            try:
                if len(parts) != 2:
                    raise ValueError
                ranges.append((int(parts[0].strip()), int(parts[1].strip())))
            except ValueError:
                continue  # a bad range is ignored, the others still count
        return (content.lower(), ranges) if ranges else None
    found = PAREN_RANGE.findall(content)
    if not found:
        return None
    event = content[:PAREN_RANGE.search(content).start()].strip().rstrip(",").lower()
    return (event, [(int(s), int(e)) for s, e in found]) if event in events else None


def strict_ave_prediction(output: str, events: dict[str, str]) -> tuple[str, list[tuple[int, int]]] | None:
    """(canonical event, ranges): the first event tag (or the text before a "(s e)"), matched
    ignoring case and punctuation; ranges from range tags or "(s e)"."""
    tag = re.search(r"<event>(.*?)</event>", output, re.DOTALL)
    text = tag.group(1) if tag else output
    paren = PAREN_RANGE.search(text)
    name = normalize_text(text[:paren.start()] if paren else text)
    if name not in events:
        return None
    ranges = [(int(s), int(e)) for s, e in re.findall(r"<range>\s*(\d+)\s*,\s*(\d+)\s*</range>", output)]
    ranges += [(int(s), int(e)) for s, e in PAREN_RANGE.findall(output)]
    return (events[name], ranges) if ranges else None


class Ave(Suite):
    name = "ave"
    option_help = {
        "vocabulary_path": "an annotation file whose categories are the event vocabulary (MokA: the full "
                           "Annotations.txt; default: the annotation file's own)",
        "video_path": "template of each sample's video path ({video_id})",
        "audio_path": "template of each sample's audio path ({video_id})",
        "protocol": "moka: MokA's prompts and 500 new tokens (default: this project's format-stating prompts)",
    }
    media_fields = ("video", "audio")
    max_new_tokens = 48
    prompt_suffix = ("Which audio-visual event happens in this video, and in which seconds? Answer as "
                     "<event>event name</event><range>start,end</range>.")
    id_scheme = "VIDEO_ID, the annotation line's VideoID"
    answer_format = ("MokA's inference_ave.jsonl (JSON lines with predict and video_path, the video id being the "
                     "file name's stem) or lines with vid and predict")

    def __init__(self, vocabulary_path: str | None = None, video_path: str = "videos/{video_id}.mp4",
                 audio_path: str = "audios/{video_id}.wav", protocol: str = "default"):
        if vocabulary_path is not None and not isinstance(vocabulary_path, str):
            raise ValueError(f"ave option vocabulary_path must be a file path, got {vocabulary_path!r}")
        self.vocabulary_path = vocabulary_path
        self.video_path = check_media_template(self.name, "video_path", video_path)
        self.audio_path = check_media_template(self.name, "audio_path", audio_path)
        check_option_choice(self.name, "protocol", protocol, PROTOCOLS)
        self.protocol = protocol
        if protocol == "moka":
            self.prompt_suffix = MOKA_INSTRUCTION
            self.max_new_tokens = MOKA_MAX_NEW_TOKENS

    def load(self, path: str) -> list[EvalSample]:
        rows = read_annotation_lines(path)
        vocabulary = sorted({r["event"] for r in read_annotation_lines(self.vocabulary_path or path)})
        samples, seen = [], set()
        for row in rows:
            if row["video_id"] in seen:
                raise AnnotationError(row["where"], f"video {row['video_id']} is listed twice")
            seen.add(row["video_id"])
            media = {"video": [self.video_path.format(video_id=row["video_id"])],
                     "audio": [self.audio_path.format(video_id=row["video_id"])]}
            samples.append(EvalSample(id=row["video_id"], question="", media=media, target=row["event"],
                                      meta={"start": row["start"], "end": row["end"], "vocabulary": vocabulary},
                                      where=row["where"]))
        return samples

    def read_answer_file(self, path, samples):
        """MokA's log: ``predict`` with the video named by ``vid``, ``video_id`` or the stem of
        ``video_path``."""
        from eval_suites.answers import AnswerRow, read_records

        records = read_records(path)
        if not records or not isinstance(records[0][1], dict) or "predict" not in records[0][1]:
            return None
        rows = []
        for where, item in records:
            require_fields(where, item, ("predict",))
            if "vid" in item or "video_id" in item:
                video = str(item.get("vid", item.get("video_id")))
            elif "video_path" in item:
                video = os.path.splitext(os.path.basename(str(item["video_path"])))[0]
            else:
                raise AnnotationError(where, "missing field 'video_path' (or 'vid'): a line must name its video")
            if not isinstance(item["predict"], str):
                raise AnnotationError(where, "field 'predict' must be text")
            rows.append(AnswerRow(where, video, item["predict"]))
        return "AVE MokA-style log", rows, []

    def score(self, samples, predictions, mode="official"):
        check_mode(mode)
        vocabulary = samples[0].meta["vocabulary"] if samples else []
        failures = correct = parsed = 0
        for sample in samples:
            output = predictions.get(sample.id)
            start, end = sample.meta["start"], sample.meta["end"]
            if mode == "official":
                prediction = None if output is None else official_ave_prediction(
                    output, {e.lower() for e in vocabulary} | {BACKGROUND})
                if prediction is None:
                    failures += output is not None
                    correct += SEGMENTS  # the untouched zero slots agree with each other
                    continue
                truth = [sample.target.lower() if start <= i <= end else BACKGROUND for i in range(SEGMENTS)]
                inside = lambda i, ranges: any(s <= i <= e for s, e in ranges)  # noqa: E731
            else:
                canonical = {normalize_text(e): e for e in vocabulary} | {BACKGROUND: BACKGROUND}
                prediction = None if output is None else strict_ave_prediction(output, canonical)
                if prediction is None:
                    failures += 1
                    continue  # all ten segments wrong
                truth = [sample.target if start <= i < end else BACKGROUND for i in range(SEGMENTS)]
                inside = lambda i, ranges: any(s <= i < e for s, e in ranges)  # noqa: E731
            parsed += 1
            event, ranges = prediction
            guess = [event if inside(i, ranges) else BACKGROUND for i in range(SEGMENTS)]
            correct += sum(g == t for g, t in zip(guess, truth))
        out = results_header(self, mode, samples, predictions, failures, len(samples))
        out["metrics"] = {"segment_accuracy": ratio(correct, SEGMENTS * len(samples)),
                          "num_segments": SEGMENTS * len(samples), "parsed_videos": parsed}
        out["score"] = out["metrics"]["segment_accuracy"]
        return out

    def write_official_files(self, samples, predictions, out_dir):
        """``inference_ave.jsonl`` in MokA's layout (``output`` = the reference string)."""
        rows = [{"vid": s.id, "output": f"event:{s.target} start_time:{s.meta['start']} end_time:{s.meta['end']}",
                 "predict": predictions[s.id]} for s in samples if s.id in predictions]
        return [write_json_lines(os.path.join(out_dir, "inference_ave.jsonl"), rows)]
