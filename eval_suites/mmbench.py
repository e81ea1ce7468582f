"""MMBench (dev/test, English or Chinese TSV): multiple choice with circular evaluation.

Annotations: the VLMEvalKit / OpenCompass TSV (``index, question, hint, A, B, C, D, answer,
category, l2-category, split, image`` with base64 images; a short digit string in ``image``
refers to another row's image). Circular copies are rows ``index + k·1e6``; when the file
holds only the main questions, the copies are built here by rotating the options, so an
N-option question is asked N times. A question is a hit only if every pass is right.
Reported: overall, per split, per ``l2-category`` and per ``category``; vanilla accuracy
(first pass only) alongside.

``official`` reproduces VLMEvalKit's rule-based matcher (``--judge exact_matching``):
``can_infer_option`` -- punctuation ``.()[],:;!*#{}`` to spaces, split on whitespace; if
exactly one option letter is a token and its first occurrence is among the last four tokens,
that letter; if no letter but a ``Z`` token, "Z" (a refusal, always wrong); else the regex
"(correct) answer is **X**"; canned refusal phrases give "Z" -- then ``can_infer_text``: if
the answer is at most twice the total option length and exactly one option's text (lower
case) is a substring of it, that option. Anything else is a miss, which sinks the whole
circular group. A judge model can be plugged in for what the rules cannot match (off by
default): as in VLMEvalKit it is asked only when the rules extract nothing -- a rule-based "Z"
(refusal) is a final answer, and wrong.

Options (``get_suite("mmbench", ...)``, ``mllm eval --option KEY=VALUE``): ``circular``
(default true; false asks each question once, on the main rows only) and ``judge`` (a callable
``judge(question, options, output) -> letter | "Z" | None``, or from the command line its
import path ``package.module:function``).
``strict`` first applies ``parsing.strict_choice`` (bare or leading letters anywhere in the
answer's shape, "the answer is X", whole-word option text), then the official rules.
"""

from __future__ import annotations

import csv
import importlib
import os
import re
import string
import sys
from typing import Callable

from eval_suites.base import (
    AnnotationError,
    AnnotationFileNotFoundError,
    EvalSample,
    Suite,
    check_mode,
    mean_of,
    results_header,
)
from eval_suites.parsing import strict_choice

CIRCULAR_STRIDE = 1_000_000
REFUSALS = ("Sorry, I can't help with images of people yet.", "I can't process this file.",
            "I'm sorry, but without the image provided", "Cannot determine the answer")
ANSWER_IS = re.compile(r"(?:correct\s+)?answer\s+is\s+\**([ABCD])\**", re.IGNORECASE)

#: judge(question_text, {letter: option_text}, model_output) -> letter or None
Judge = Callable[[str, dict, str], "str | None"]


def load_judge(path: str) -> Judge:
    """The judge function named ``package.module:function`` (or ``package.module.function``)."""
    module_name, sep, attribute = path.partition(":")
    if not sep:
        module_name, _, attribute = path.rpartition(".")
    if not module_name or not attribute:
        raise ValueError(f"mmbench option judge: expected 'package.module:function', got {path!r}")
    try:
        judge = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"mmbench option judge: cannot load {path!r} ({e})") from None
    if not callable(judge):
        raise ValueError(f"mmbench option judge: {path!r} is not callable")
    return judge


def official_option_letter(answer: str, options: dict[str, str]) -> str | None:
    """VLMEvalKit ``can_infer_option``: a letter, "Z" (refusal) or None."""
    if any(refusal in answer for refusal in REFUSALS):
        return "Z"
    spaced = answer
    for char in ".()[],:;!*#{}":
        spaced = spaced.replace(char, " ")
    tokens = spaced.split()
    present = [letter for letter in options if letter in tokens]
    if len(present) == 1:
        if tokens.index(present[0]) > len(tokens) - 5:
            return present[0]
    elif not present and "Z" in tokens:
        return "Z"
    said = ANSWER_IS.search(answer)
    if said and said.group(1).upper() in options:
        return said.group(1).upper()
    return None


def official_option_text(answer: str, options: dict[str, str]) -> str | None:
    """VLMEvalKit ``can_infer_text``: the one option whose text is a substring of the answer."""
    answer = answer.lower()
    if len(answer) > 2 * sum(len(str(v)) for v in options.values()):
        return None
    found = [letter for letter, text in options.items() if str(text).lower() in answer]
    return found[0] if len(found) == 1 else None


def official_choice(answer: str, options: dict[str, str]) -> str | None:
    return official_option_letter(answer, options) or official_option_text(answer, options)


def _missing(value) -> bool:
    return value is None or value.strip() in ("", "nan", "NaN", "None")


def format_question(row: dict, options: dict[str, str]) -> str:
    """VLMEvalKit's MMBench prompt, up to its closing instruction (the suite's suffix)."""
    text = "" if _missing(row.get("hint")) else f"Hint: {row['hint']}\n"
    text += f"Question: {row['question']}\nOptions:\n"
    return text + "".join(f"{letter}. {option}\n" for letter, option in options.items())


class Mmbench(Suite):
    name = "mmbench"
    option_help = {
        "circular": "CircularEval: a question counts only if every rotation of its options is answered right",
        "judge": "a function 'package.module:function' called as judge(question, options, output) for answers "
                 "the rules cannot match",
    }
    media_fields = ("image",)
    max_new_tokens = 128
    prompt_suffix = "Please select the correct answer from the options above. \n"
    id_scheme = "INDEX, the TSV's index column (circular copies: INDEX + k*1000000)"
    answer_format = ("a VLMEvalKit prediction table (the dataset TSV plus a 'prediction' column, as .tsv or .csv; "
                     "save an .xlsx as one of these)")

    def __init__(self, circular: bool = True, judge: Judge | str | None = None):
        if not isinstance(circular, bool):
            raise ValueError(f"mmbench option circular must be true or false, got {circular!r}")
        self.circular = circular
        self.judge = load_judge(judge) if isinstance(judge, str) else judge
        if self.judge is not None and not callable(self.judge):
            raise ValueError(f"mmbench option judge must be a callable or 'package.module:function', got {judge!r}")

    # ------------------------------------------------------------------ reading
    def load(self, path: str) -> list[EvalSample]:
        rows = self._read_rows(path)
        images = {row["index"]: row.get("image") for row in rows}
        has_copies = any(row["index"] >= CIRCULAR_STRIDE for row in rows)
        samples = []
        for row in rows:
            if not self.circular and row["index"] >= CIRCULAR_STRIDE:
                continue
            copies = [row]
            if self.circular and not has_copies:
                copies = [self._rotated(row, k) for k in range(len(row["options"]))]
            for copy in copies:
                samples.append(self._sample(copy, images, path))
        return samples

    def _read_rows(self, path: str) -> list[dict]:
        csv.field_size_limit(sys.maxsize)  # base64 images are long fields
        try:
            f = open(path, encoding="utf-8", newline="")
        except FileNotFoundError:
            raise AnnotationFileNotFoundError(path) from None
        rows = []
        with f:
            reader = csv.DictReader(f, delimiter="\t")
            header = reader.fieldnames or []
            for needed in ("index", "question", "A", "B"):
                if needed not in header:
                    raise AnnotationError(f"{path}:1", f"the header has no {needed!r} column")
            letters = [c for c in string.ascii_uppercase if c in header]
            for row in reader:
                where = f"{path}:{reader.line_num}"
                if None in row or any(v is None for v in row.values()):
                    raise AnnotationError(where, f"expected {len(header)} tab-separated fields")
                try:
                    row["index"] = int(float(row["index"]))
                except ValueError:
                    raise AnnotationError(where, f"index {row['index']!r} is not a number") from None
                row["options"] = {c: row[c] for c in letters if not _missing(row[c])}
                if len(row["options"]) < 2:
                    raise AnnotationError(where, "fewer than two options")
                answer = row.get("answer")
                if not _missing(answer) and answer.strip() not in row["options"]:
                    raise AnnotationError(where, f"answer {answer!r} is not one of the options")
                row["where"] = where
                rows.append(row)
        return rows

    @staticmethod
    def _rotated(row: dict, shift: int) -> dict:
        """Pass ``shift`` of the circular group: option i shows the text of option i+shift."""
        if shift == 0:
            return row
        letters = list(row["options"])
        texts = [row["options"][c] for c in letters]
        n = len(letters)
        rotated = dict(row, index=row["index"] + shift * CIRCULAR_STRIDE,
                       options={letters[i]: texts[(i + shift) % n] for i in range(n)})
        if not _missing(row.get("answer")):
            rotated["answer"] = letters[(letters.index(row["answer"].strip()) - shift) % n]
        return rotated

    def _sample(self, row: dict, images: dict, path: str) -> EvalSample:
        group = row["index"] % CIRCULAR_STRIDE
        image = row.get("image")
        media, inline = {}, {}
        if not _missing(image):
            if len(image) <= 64 and image.isdigit():  # a reference to another row's image
                image = images.get(int(image))
                if _missing(image):
                    raise AnnotationError(row["where"], f"image refers to row {row['image']}, which has no image")
            name = f"mmbench_images/{group}"
            media, inline = {"image": [name]}, {name: image}
        meta = {k: row.get(k) for k in ("category", "l2-category", "split", "question", "hint")}
        meta.update(index=row["index"], group=group, options=row["options"],
                    columns={k: v for k, v in row.items() if k not in ("image", "options", "where")})
        answer = None if _missing(row.get("answer")) else row["answer"].strip()
        return EvalSample(id=str(row["index"]), question=format_question(row, row["options"]), media=media,
                          target=answer, meta=meta, inline_media=inline, where=row.get("where", ""))

    def read_answer_file(self, path, samples):
        """A prediction table: rows with ``index`` and ``prediction`` (tab-separated, or
        comma-separated for .csv)."""
        from eval_suites.answers import AnswerRow

        if path.lower().endswith((".xlsx", ".xls")):
            raise AnnotationError(path, "reading .xlsx needs openpyxl, which is not installed; save the sheet as "
                                        ".tsv or .csv (VLMEvalKit reads those too)")
        csv.field_size_limit(sys.maxsize)
        with open(path, encoding="utf-8-sig", newline="") as f:
            reader = csv.DictReader(f, delimiter="," if path.lower().endswith(".csv") else "\t")
            header = reader.fieldnames or []
            if "index" not in header or "prediction" not in header:
                return None
            rows = []
            for row in reader:
                where = f"{path}:{reader.line_num}"
                try:
                    index = str(int(float(row["index"])))
                except (TypeError, ValueError):
                    raise AnnotationError(where, f"field 'index' {row['index']!r} is not a number") from None
                rows.append(AnswerRow(where, index, row["prediction"] or ""))
        return "VLMEvalKit prediction table", rows, []

    # ------------------------------------------------------------------ scoring
    def choose(self, sample: EvalSample, answer: str, mode: str) -> tuple[str | None, bool]:
        """(letter, "Z" or None; whether the judge was asked).

        As in VLMEvalKit, what the rules extract is final -- a refusal ("Z") included -- and the
        judge is asked only when they extract nothing. A judge's reply that is neither an
        option letter nor "Z" counts as no answer."""
        options = sample.meta["options"]
        letter = strict_choice(answer, options) if mode == "strict" else None
        letter = letter or official_choice(answer, options)
        if letter is None and self.judge is not None:
            judged = self.judge(sample.question, options, answer)
            return (judged if judged in options or judged == "Z" else None), True
        return letter, False

    def score(self, samples, predictions, mode="official"):
        check_mode(mode)
        scorable = [s for s in samples if s.target is not None]
        groups: dict[int, list] = {}
        failures = judged = 0
        for sample in scorable:
            letter, asked = self.choose(sample, predictions.get(sample.id, ""), mode)
            failures += letter in (None, "Z")
            judged += asked
            groups.setdefault(sample.meta["group"], []).append((sample, letter == sample.target))
        hits_by: dict[str, dict[str, list]] = {"split": {}, "l2-category": {}, "category": {}}
        overall, vanilla = [], []
        for passes in groups.values():
            passes.sort(key=lambda p: p[0].meta["index"])
            main, hit = passes[0][0], all(h for _, h in passes)
            overall.append(hit)
            vanilla.append(passes[0][1])
            for key, table in hits_by.items():
                table.setdefault(str(main.meta.get(key)), []).append(hit)
        out = results_header(self, mode, samples, predictions, failures, len(scorable))
        out["judge_calls"] = judged
        out["metrics"] = {"overall": mean_of(overall), "vanilla_accuracy": mean_of(vanilla),
                          "num_questions": len(overall), "circular": self.circular,
                          **{key: {k: mean_of(v) for k, v in sorted(t.items())} for key, t in hits_by.items()}}
        out["score"] = out["metrics"]["overall"]
        return out

    def write_official_files(self, samples, predictions, out_dir):
        """``mmbench_submission.tsv``: the dataset columns (images left out) plus ``prediction``
        -- the input of VLMEvalKit's evaluate and of the OpenCompass server (which wants it
        saved as .xlsx)."""
        os.makedirs(out_dir, exist_ok=True)
        path = os.path.join(out_dir, "mmbench_submission.tsv")
        rows = []
        for s in samples:
            row = dict(s.meta["columns"], index=s.meta["index"], **s.meta["options"])
            row["answer"] = s.target or ""
            row["prediction"] = predictions.get(s.id, "")
            rows.append(row)
        columns = list(dict.fromkeys(k for r in rows for k in r))
        with open(path, "w", encoding="utf-8", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=columns, delimiter="\t")
            writer.writeheader()
            writer.writerows(rows)
        return [path]
