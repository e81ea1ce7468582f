"""MMAU test-mini, speech subset (``task == "speech"``; option ``subset``: sound, music, or all).

Annotations: ``mmau-test-mini.json`` (a JSON list; ``answer`` is the option *text*, ``choices``
holds 2-5 strings; audio at ``<media-root>/<audio_id>``). Reported: accuracy overall and per
task, category, sub-category and difficulty. State the file version you score (v05.15.25
revised about a quarter of the questions).

``official`` scores ``model_output`` exactly as the official ``evaluation.py`` does, on the raw
output: ``string_match`` -- lower-case word sets (``\\b\\w+\\b``); right iff every answer word
is in the output and the output has no word that belongs to a wrong choice but not to the
answer ("The answer is <text>" can fail on filler words); an empty output is wrong; **a bare
letter ("B", "(B)") is scored as the one word it is, so it is wrong** unless that letter is the
answer's only word; **records without an output are
skipped** (left out of the denominator). ``mmau_predictions.json`` (the official script's
input) holds the raw outputs, so ``evaluation.py`` prints the same number.
``strict`` picks the option with ``parsing.strict_choice`` (letters included) and compares it
with the answer; records without an output or without a recognisable choice count as wrong.

Option ``letter_to_text`` (default false): in ``official`` mode, submit the chosen option's
text for an output that is just a letter ("B", "(B)", "B.") -- the conversion the MMAU authors
ask submitters to do before running ``evaluation.py``. It is recorded in the results
(``suite_options``), and the official file then holds the converted text in ``model_output``
(the raw output stays in ``raw_output``).
"""

from __future__ import annotations

import json
import os
import re
import string

from eval_suites.base import (
    AnnotationError,
    EvalSample,
    Suite,
    check_mode,
    check_option_choice,
    iter_json_items,
    mean_of,
    require_fields,
    results_header,
)
from eval_suites.parsing import normalize_text, strict_choice

BREAKDOWNS = ("task", "category", "sub-category", "difficulty")
SUBSETS = ("speech", "sound", "music", "all")


def word_set(text: str) -> set[str]:
    return set(re.findall(r"\b\w+\b", text.lower()))


def official_string_match(answer: str, prediction: str, choices: list[str]) -> bool:
    prediction_words, answer_words = word_set(prediction), word_set(answer)
    if not prediction_words:
        return False
    wrong_words = set()
    for choice in choices:
        choice_words = word_set(choice)
        if choice_words != answer_words:
            wrong_words |= choice_words - answer_words
    return answer_words <= prediction_words and not (prediction_words & wrong_words)


def submitted_text(output: str, choices: list[str]) -> str:
    """The option text for a bare-letter output, else the output itself."""
    letters = string.ascii_uppercase[:len(choices)]
    bare = output.strip().strip(" .()[]:*")
    return choices[letters.index(bare)] if len(bare) == 1 and bare in letters else output


class Mmau(Suite):
    name = "mmau"
    option_help = {
        "subset": "speech, sound, music or all",
        "letter_to_text": "in official mode, score a bare letter as its option's text (off by default: "
                          "evaluation.py scores the raw output)",
    }
    media_fields = ("speech",)
    max_new_tokens = 128  # lmms-eval's mmau_test_mini
    prompt_suffix = "\nAnswer with the option's letter from the given choices directly."
    id_scheme = "ID, the record's id"
    answer_format = "evaluation.py's input (the annotation records, each with model_output, as a JSON list)"

    def __init__(self, subset: str = "speech", letter_to_text: bool = False):
        """``subset``: the ``task`` to keep -- speech (default), sound, music -- or all;
        ``letter_to_text``: submit a bare letter's option text in ``official`` mode."""
        check_option_choice(self.name, "subset", subset, SUBSETS)
        if not isinstance(letter_to_text, bool):
            raise ValueError(f"mmau option letter_to_text must be true or false, got {letter_to_text!r}")
        self.subset = subset
        self.letter_to_text = letter_to_text
        if subset != "speech":
            self.media_fields = ("audio", "speech")

    def load(self, path: str) -> list[EvalSample]:
        samples = []
        for where, item in iter_json_items(path):
            require_fields(where, item, ("id", "audio_id", "question", "answer", "choices", "task"))
            if self.subset != "all" and item["task"] != self.subset:
                continue
            choices = item["choices"]
            if isinstance(choices, str):  # lmms-lab's copy stores the list as a JSON string
                choices = json.loads(choices)
            options = dict(zip(string.ascii_uppercase, choices))
            question = item["question"] + "".join(f"\n{letter}. {text}" for letter, text in options.items())
            media_field = "speech" if item["task"] == "speech" else "audio"
            samples.append(EvalSample(
                id=str(item["id"]), question=question, media={media_field: [item["audio_id"]]},
                target=item["answer"], meta={"options": options, "choices": choices, "record": item,
                                             **{k: item.get(k) for k in BREAKDOWNS}}, where=where))
        return samples

    def read_answer_file(self, path, samples):
        """``evaluation.py``'s input: records with ``id`` and ``model_output``. A record without
        ``model_output`` is no answer (the official script skips it)."""
        from eval_suites.answers import AnswerRow, read_records

        records = read_records(path)
        if not records or not all(isinstance(item, dict) for _, item in records):
            return None
        if not any("model_output" in item for _, item in records):
            if any("model_prediction" in item for _, item in records):
                raise AnnotationError(path, "its records hold 'model_prediction' (the name in MMAU's README and "
                                            "lmms-eval's file) but evaluation.py reads 'model_output', so it would "
                                            "score none of them; rename the field")
            return None
        rows = []
        for where, item in records:
            require_fields(where, item, ("id",))
            output = item.get("model_output")
            if output is not None and not isinstance(output, str):
                raise AnnotationError(where, "field 'model_output' must be text")
            rows.append(AnswerRow(where, str(item["id"]), output))
        without = sum(row.prediction is None for row in rows)
        notes = [f"{without} records have no model_output (skipped, as evaluation.py does)"] if without else []
        return "MMAU evaluation.py input", rows, notes

    def score(self, samples, predictions, mode="official"):
        check_mode(mode)
        hits_by: dict[str, dict[str, list]] = {key: {} for key in BREAKDOWNS}
        overall, failures = [], 0
        for sample in samples:
            output = predictions.get(sample.id)
            if output is None and mode == "official":
                continue  # evaluation.py skips records without model_output
            if mode == "official":
                hit = official_string_match(sample.target, self.model_output(output, sample),
                                            sample.meta["choices"])
            else:
                letter = strict_choice(output or "", sample.meta["options"])
                failures += letter is None
                hit = letter is not None and (normalize_text(sample.meta["options"][letter])
                                              == normalize_text(sample.target))
            overall.append(hit)
            for key, table in hits_by.items():
                table.setdefault(str(sample.meta.get(key)), []).append(hit)
        out = results_header(self, mode, samples, predictions, failures, len(overall))
        out["metrics"] = {"accuracy": mean_of(overall),
                          **{key: {k: mean_of(v) for k, v in sorted(t.items())} for key, t in hits_by.items()}}
        out["score"] = out["metrics"]["accuracy"]
        return out

    def model_output(self, output: str, sample: EvalSample) -> str:
        """What ``official`` mode scores, and the official file holds: the raw output, or with
        ``letter_to_text`` a bare letter's option text."""
        return submitted_text(output, sample.meta["choices"]) if self.letter_to_text else output

    def write_official_files(self, samples, predictions, out_dir):
        """``mmau_predictions.json`` for ``evaluation.py --input``: the records that have an
        output, each with ``model_output`` (the key the code reads, not the README's) as
        ``official`` mode scores it -- the raw output unless ``letter_to_text`` is on."""
        rows = []
        for s in samples:
            if s.id not in predictions:
                continue
            row = dict(s.meta["record"], model_output=self.model_output(predictions[s.id], s))
            if row["model_output"] != predictions[s.id]:
                row["raw_output"] = predictions[s.id]
            rows.append(row)
        os.makedirs(out_dir, exist_ok=True)
        path = os.path.join(out_dir, "mmau_predictions.json")
        with open(path, "w", encoding="utf-8") as f:
            json.dump(rows, f, ensure_ascii=False, indent=1)
        return [path]
