"""Answers to score: this project's answer log, or a benchmark's own answer format.

The answer log (``<output>/samples.jsonl``, what ``mllm eval`` writes while generating) is JSON
lines: a first ``{"log_header": ...}`` line recording the checkpoint and prompt format that
produced it, then one ``{"id": SAMPLE_ID, "prediction": TEXT}`` line per answer. A sample's id
follows its suite's scheme (``Suite.id_scheme``, listed by ``mllm eval --help``).

``read_answers`` also reads each benchmark's own answer file (``Suite.read_answer_file``: POPE's
``evaluate.py`` answers, MME's results folder, MMAU's ``model_output`` JSON, ...) and matches its
answers to the samples: answers whose id matches no sample, repeated ids and samples left
without an answer are counted (``Answers.report``), and a file none of whose answers matches a
sample is an error that shows an expected id next to one the file holds.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field

from eval_suites.base import AnnotationError, AnnotationFileNotFoundError, EvalSample

logger = logging.getLogger(__name__)

LOG_FORMAT = "answer log ({id, prediction} JSON lines)"
HEADER_KEY = "log_header"
#: examples of each kind of mismatch kept in the report
EXAMPLES = 3


@dataclass
class AnswerRow:
    where: str                 # "file:line" of the answer
    id: str                    # the sample id it answers
    prediction: str | None     # None: the record holds no answer (scored as a missing one)


@dataclass
class Answers:
    path: str
    format: str
    predictions: dict[str, str]
    unmatched: list[AnswerRow] = field(default_factory=list)    # ids that match no sample
    duplicates: list[AnswerRow] = field(default_factory=list)   # second and later answers to an id
    unanswered: list[str] = field(default_factory=list)         # sample ids with no answer
    notes: list[str] = field(default_factory=list)              # format-specific remarks
    header: dict | None = None                                  # the answer log's header line

    def report(self) -> dict:
        """Counts (and a few examples) for the results JSON."""
        return {"file": os.path.abspath(self.path), "format": self.format, "matched": len(self.predictions),
                "unmatched": len(self.unmatched), "duplicates": len(self.duplicates),
                "unanswered": len(self.unanswered), "notes": self.notes,
                "examples": {"unmatched": [f"{r.where}: {r.id}" for r in self.unmatched[:EXAMPLES]],
                             "duplicates": [f"{r.where}: {r.id}" for r in self.duplicates[:EXAMPLES]],
                             "unanswered": self.unanswered[:EXAMPLES]}}

    def summary(self) -> str:
        """One line for the log."""
        return (f"{self.path} ({self.format}): {len(self.predictions)} answers matched; "
                f"{len(self.unmatched)} match no sample, {len(self.duplicates)} repeat an id, "
                f"{len(self.unanswered)} samples have no answer")


# --------------------------------------------------------------------------- the answer log


def answer_log_rows(path: str, repair: bool = False) -> tuple[dict | None, list[AnswerRow]]:
    """``(header, rows)`` of an answer log; a missing file is an empty log.

    A last line cut off by an interrupted write is ignored, and with ``repair`` removed from the
    file so that appending can go on; a bad line anywhere else is an error naming the line.
    """
    if not os.path.exists(path):
        return None, []
    with open(path, "rb") as f:
        data = f.read()
    header, rows, offset = None, [], 0
    lines = data.split(b"\n")
    for lineno, raw in enumerate(lines, start=1):
        is_last = lineno == len(lines)
        where = f"{path}:{lineno}"
        if raw.strip():
            try:
                row = json.loads(raw)
                if not isinstance(row, dict):
                    raise AnnotationError(where, f"expected a JSON object, got {type(row).__name__}")
                if HEADER_KEY in row:
                    header = row
                else:
                    for key in ("id", "prediction"):
                        if key not in row:
                            raise AnnotationError(where, f"missing field {key!r}; an answer log line is "
                                                         f'{{"id": SAMPLE_ID, "prediction": TEXT}}')
                    if row["prediction"] is not None and not isinstance(row["prediction"], str):
                        raise AnnotationError(where, "field 'prediction' must be text")
                    rows.append(AnswerRow(where, str(row["id"]), row["prediction"]))
                if is_last and repair:  # complete but its newline was never written
                    with open(path, "ab") as f:
                        f.write(b"\n")
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                if not is_last:
                    raise AnnotationError(where, f"not an answer log line ({e})") from None
                logger.warning("%s: ignoring a line cut off by an interrupted run", where)
                if repair:
                    with open(path, "r+b") as f:
                        f.truncate(offset)
                break
        offset += len(raw) + 1
    return header, rows


def is_answer_log(path: str) -> bool:
    """Whether ``path`` starts like an answer log (a header line or an ``{id, prediction}`` line)."""
    if os.path.isdir(path):
        return False
    with open(path, "rb") as f:
        for raw in f:
            if raw.strip():
                try:
                    row = json.loads(raw)
                except (json.JSONDecodeError, UnicodeDecodeError):
                    return False
                return isinstance(row, dict) and (HEADER_KEY in row or {"id", "prediction"} <= set(row))
    return True  # an empty file: an empty log


# --------------------------------------------------------------------------- matching


def match_answers(path: str, format: str, rows: list[AnswerRow], samples: list[EvalSample],
                  notes: list[str] | None = None, header: dict | None = None) -> Answers:
    """Match ``rows`` to ``samples`` by id; refuse a file none of whose answers matches."""
    ids = {s.id for s in samples}
    answers = Answers(path, format, {}, notes=list(notes or []), header=header)
    seen = set()
    for row in rows:
        if row.id not in ids:
            answers.unmatched.append(row)
        elif row.id in seen:
            answers.duplicates.append(row)  # the first answer counts
        else:
            seen.add(row.id)
            if row.prediction is not None:
                answers.predictions[row.id] = row.prediction
    answers.unanswered = [s.id for s in samples if s.id not in answers.predictions]
    if samples and not answers.predictions:
        if not rows:
            raise AnnotationError(path, f"holds no answers (read as {format})")
        got = answers.unmatched[0] if answers.unmatched else rows[0]
        raise AnnotationError(path, f"none of its {len(rows)} answers matches one of the {len(samples)} samples "
                                    f"(read as {format}): expected ids such as {samples[0].id!r}, but "
                                    f"{got.where} answers {got.id!r}"
                                    + (" with no answer text" if got.id in ids else ""))
    for kind, found in (("match no sample", answers.unmatched), ("repeat an earlier id", answers.duplicates)):
        if found:
            logger.warning("%s: %d answers %s, e.g. %s: %r", path, len(found), kind, found[0].where, found[0].id)
    if answers.unanswered:
        logger.warning("%s: %d of %d samples have no answer, e.g. %r", path, len(answers.unanswered), len(samples),
                       answers.unanswered[0])
    return answers


def read_answers(suite, samples: list[EvalSample], path: str) -> Answers:
    """The answers in ``path`` (an answer log or the suite's own answer format) matched to
    ``samples``."""
    if not os.path.exists(path):
        raise AnnotationFileNotFoundError(path, "answers file not found")
    if is_answer_log(path):
        header, rows = answer_log_rows(path)
        return match_answers(path, LOG_FORMAT, rows, samples, header=header)
    try:
        found = suite.read_answer_file(path, samples)
    except IsADirectoryError:
        raise AnnotationError(path, f"is a folder; {suite.name} answers are a file ({suite.answer_format}, or "
                                    f"an {LOG_FORMAT})") from None
    except UnicodeDecodeError as e:
        raise AnnotationError(path, f"not a text file ({e.reason} at byte {e.start})") from None
    if found is None:
        raise AnnotationError(path, f"neither an {LOG_FORMAT} nor {suite.answer_format}")
    format, rows, notes = found
    return match_answers(path, format, rows, samples, notes)


def read_records(path: str) -> list[tuple[str, object]]:
    """``[(where, record)]`` of a JSON list or JSON-lines file, errors naming file and line."""
    from eval_suites.base import iter_json_items

    try:
        return list(iter_json_items(path))
    except UnicodeDecodeError as e:
        raise AnnotationError(path, f"not a text file ({e.reason})") from None
