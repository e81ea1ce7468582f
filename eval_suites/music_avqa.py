"""MUSIC-AVQA: open questions about music videos, answered with one of 42 words.

Annotations: ``avqa-test.json`` from ``data/json_update`` (or the original ``data/json``): a
JSON list of ``{video_id, question_id, type, question_content, templ_values, anser}``, where
``type`` and ``templ_values`` are JSON strings and ``<Object>``-style placeholders in the
question are filled in order from ``templ_values``. Media: the video and its audio track
(paths set by ``video_path`` / ``audio_path``, relative to the media root). Reported:
accuracy per sub-type (Audio: Counting, Comparative; Visual: Counting, Location; Audio-Visual:
Existential, Counting, Location, Comparative, Temporal), per modality and overall (micro).

The official scorer is a 42-way classifier; for generated answers the reference is MokA's
``avqa_eval.py``, which ``official`` reproduces: exactly one ``<answer>…</answer>`` whose
stripped, lower-cased content is in the vocabulary, **else the question is skipped** (out of
every denominator); right iff the reference is a substring of it ("ten" is inside "more than
ten"). Questions without an answer are skipped too.
``strict`` counts every question: the tagged answer (or the whole output), normalised
(digits to words, "acoustic guitar" to ``acoustic_guitar``), must equal the reference.

Prompt and length differ from MokA's inference (``unified_dataset.py`` / ``inference_cut.py``),
which asks "Please answer this question: {question}" with no answer-format instruction and
generates up to 500 new tokens. MokA's models were fine-tuned on MUSIC-AVQA training targets
that carry the ``<answer>`` tag (after some reasoning text), so they learn the format the
scorer parses and may need many tokens before the tag. A checkpoint tuned on other data has
never seen that format, so the default here states it in the prompt
("... written as <answer>word</answer>") and, since one tagged word is asked for, stops at 32
new tokens. To score a checkpoint trained the MokA way, use ``protocol="moka"``
(``--option protocol=moka``): MokA's question wording, no suffix, 500 new tokens. Its
prompt framing ("This is a video: <video_start>...") is tied to MokA's own model and is not
reproduced: the media placeholders are this project's. ``--max-new-tokens`` and
``--prompt-suffix`` still override either protocol.

Options: ``video_path`` / ``audio_path`` (templates with ``{video_id}``, relative to the media
root; defaults ``videos/{video_id}.mp4`` and ``audios/{video_id}.wav``), ``protocol``
(``default`` or ``moka``).
"""

from __future__ import annotations

import ast
import os
import re

from eval_suites.base import (
    AnnotationError,
    EvalSample,
    Suite,
    check_media_template,
    check_mode,
    check_option_choice,
    iter_json_items,
    mean_of,
    require_fields,
    results_header,
    write_json_lines,
)

NUMBERS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
INSTRUMENTS = ("accordion", "acoustic_guitar", "bagpipe", "banjo", "bassoon", "cello", "clarinet", "congas",
               "drum", "electric_bass", "erhu", "flute", "guzheng", "piano", "pipa", "saxophone", "suona",
               "trumpet", "tuba", "ukulele", "violin", "xylophone")
VOCABULARY = frozenset(("yes", "no", *NUMBERS, "more than ten", "left", "middle", "right", "indoor", "outdoor",
                        "simultaneously", *INSTRUMENTS))
SUBTYPES = {"Audio": ("Counting", "Comparative"), "Visual": ("Counting", "Location"),
            "Audio-Visual": ("Existential", "Counting", "Location", "Comparative", "Temporal")}
ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>")
PROTOCOLS = ("default", "moka")
MOKA_QUESTION_PREFIX = "Please answer this question: "  # MokA's unified_dataset.py
MOKA_MAX_NEW_TOKENS = 500                                 # MokA's inference_cut.py


def official_avqa_answer(output: str) -> str | None:
    """MokA's parse: the content of the single answer tag, if it is a vocabulary word."""
    matches = ANSWER_TAG.findall(output)
    if len(matches) != 1:
        return None
    answer = matches[0].strip().lower()
    return answer if answer in VOCABULARY else None


def _to_vocabulary(text: str) -> str | None:
    words = re.findall(r"[a-z0-9_]+", text.lower())
    words = [NUMBERS[int(w)] if w.isdigit() and int(w) <= 10 else w for w in words]
    phrase = " ".join(words)
    for candidate in (phrase, phrase.replace(" ", "_")):
        if candidate in VOCABULARY:
            return candidate
    # The one vocabulary term present as whole words ("There are two." -> two).
    padded = f" {phrase} "
    found = {v for v in VOCABULARY if f" {v.replace('_', ' ')} " in f" {padded.replace('_', ' ')} "}
    found -= {v for v in found if any(v != w and f" {v} " in f" {w} " for w in found)}  # ten inside more than ten
    return found.pop() if len(found) == 1 else None


def strict_avqa_answer(output: str) -> str | None:
    tagged = {_to_vocabulary(m) for m in ANSWER_TAG.findall(output)}
    if tagged:
        return tagged.pop() if len(tagged) == 1 else None
    return _to_vocabulary(output)


def _literal(where: str, item: dict, key: str):
    value = item[key]
    if isinstance(value, str):
        try:
            value = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            raise AnnotationError(where, f"{key} {item[key]!r} is not a list literal") from None
    if not isinstance(value, list):
        raise AnnotationError(where, f"{key} must be a list")
    return value


class MusicAvqa(Suite):
    name = "music_avqa"
    option_help = {
        "video_path": "template of each sample's video path ({video_id})",
        "audio_path": "template of each sample's audio path ({video_id})",
        "protocol": "moka: MokA's prompts and 500 new tokens (default: this project's format-stating prompts)",
    }
    media_fields = ("video", "audio")
    max_new_tokens = 32
    prompt_suffix = "\nAnswer with a single word, written as <answer>word</answer>."
    id_scheme = "QUESTION_ID, the annotation's question_id"
    answer_format = "a MokA-style log (JSON lines with question_id and predict, as avqa_eval.py reads)"

    def __init__(self, video_path: str = "videos/{video_id}.mp4", audio_path: str = "audios/{video_id}.wav",
                 protocol: str = "default"):
        self.video_path = check_media_template(self.name, "video_path", video_path)
        self.audio_path = check_media_template(self.name, "audio_path", audio_path)
        check_option_choice(self.name, "protocol", protocol, PROTOCOLS)
        self.protocol = protocol
        self.question_prefix = ""
        if protocol == "moka":
            self.question_prefix = MOKA_QUESTION_PREFIX
            self.prompt_suffix = ""
            self.max_new_tokens = MOKA_MAX_NEW_TOKENS

    def load(self, path: str) -> list[EvalSample]:
        samples = []
        for where, item in iter_json_items(path):
            require_fields(where, item, ("video_id", "question_id", "type", "question_content", "templ_values",
                                         "anser"))
            question_type = _literal(where, item, "type")
            if len(question_type) != 2 or question_type[1] not in SUBTYPES.get(question_type[0], ()):
                raise AnnotationError(where, f"unknown question type {question_type!r}")
            values = iter(_literal(where, item, "templ_values"))
            question = re.sub(r"<[A-Za-z]+>", lambda m: str(next(values, m.group(0))), item["question_content"])
            answer = str(item["anser"]).strip().lower()
            if answer not in VOCABULARY:
                raise AnnotationError(where, f"answer {item['anser']!r} is not in the 42-word vocabulary")
            media = {"video": [self.video_path.format(video_id=item["video_id"])],
                     "audio": [self.audio_path.format(video_id=item["video_id"])]}
            samples.append(EvalSample(id=str(item["question_id"]), question=self.question_prefix + question,
                                      media=media, target=answer, where=where,
                                      meta={"type": question_type, "video_id": item["video_id"]}))
        return samples

    def read_answer_file(self, path, samples):
        """MokA-style lines: ``predict`` and the ``question_id`` it answers."""
        from eval_suites.answers import AnswerRow, read_records

        records = read_records(path)
        if not records or not isinstance(records[0][1], dict) or "predict" not in records[0][1]:
            return None
        rows = []
        for where, item in records:
            if "question_id" not in item:
                raise AnnotationError(where, "missing field 'question_id': a line must name the annotation question "
                                             "it answers (several questions share a video)")
            require_fields(where, item, ("predict",))
            if not isinstance(item["predict"], str):
                raise AnnotationError(where, "field 'predict' must be text")
            rows.append(AnswerRow(where, str(item["question_id"]), item["predict"]))
        return "MUSIC-AVQA MokA-style log", rows, []

    def score(self, samples, predictions, mode="official"):
        check_mode(mode)
        by_subtype: dict[tuple, list] = {}
        failures = 0
        for sample in samples:
            output = predictions.get(sample.id)
            if output is None and mode == "official":
                continue
            pred = official_avqa_answer(output) if mode == "official" else strict_avqa_answer(output or "")
            if pred is None:
                failures += 1
                if mode == "official":
                    continue  # skipped: out of every denominator
            hit = pred is not None and (sample.target in pred if mode == "official" else pred == sample.target)
            by_subtype.setdefault(tuple(sample.meta["type"]), []).append(hit)
        subtypes = {f"{m}/{s}": mean_of(by_subtype.get((m, s), [])) for m, subs in SUBTYPES.items() for s in subs}
        modalities = {m: mean_of([h for s in subs for h in by_subtype.get((m, s), [])]) for m, subs in SUBTYPES.items()}
        hits = [h for v in by_subtype.values() for h in v]
        out = results_header(self, mode, samples, predictions, failures, len(hits))
        out["metrics"] = {"accuracy": mean_of(hits), "modalities": modalities, "subtypes": subtypes,
                          "subtype_sizes": {f"{m}/{s}": len(by_subtype.get((m, s), []))
                                            for m, subs in SUBTYPES.items() for s in subs}}
        out["score"] = out["metrics"]["accuracy"]
        return out

    def write_official_files(self, samples, predictions, out_dir):
        """``inference_avqa.jsonl`` in MokA's layout (``output`` = reference, ``predict``,
        ``question_type``) for ``avqa_eval.py``."""
        rows = [{"question_id": s.id, "video_id": s.meta["video_id"], "output": s.target,
                 "predict": predictions[s.id], "question_type": s.meta["type"]}
                for s in samples if s.id in predictions]
        return [write_json_lines(os.path.join(out_dir, "inference_avqa.jsonl"), rows)]
