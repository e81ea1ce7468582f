"""SEED-Bench v1, image part (evaluation dimensions 1-9): four-option multiple choice.

Annotations: ``SEED-Bench.json`` (``{"questions": [...], "question_type": {name: id}}``);
only ``data_type == "image"`` records are used, their images at ``<media-root>/<data_id>``.
Reported: accuracy per evaluation dimension and overall.

The official protocol ranks the four choices by likelihood; its ``eval.py`` accuracy loop is
broken, so the practical reference for generative models is LLaVA-1.5's
``convert_seed_for_submission.py``, which ``official`` reproduces: an answer is right only if
the (already stripped) output *equals* the answer letter -- "A." or "(A)" are wrong -- and a
question without an answer counts as wrong.
``strict`` extracts the letter with ``parsing.strict_choice`` (letters in any usual shape,
"the answer is X", the option text).
"""

from __future__ import annotations

import os

from eval_suites.base import (
    AnnotationError,
    EvalSample,
    Suite,
    check_mode,
    mean_of,
    read_json_object_with_list,
    require_fields,
    results_header,
    write_json_lines,
)
from eval_suites.parsing import strict_choice

LETTERS = ("A", "B", "C", "D")


class SeedBench(Suite):
    name = "seed_bench"
    media_fields = ("image",)
    max_new_tokens = 128
    prompt_suffix = "\nAnswer with the option's letter from the given choices directly."
    id_scheme = "QUESTION_ID, the annotation's question_id (e.g. 101669)"
    answer_format = ("LLaVA's answer file ({question_id, text} JSON lines, convert_seed_for_submission.py's "
                     "--result-file) or the leaderboard upload ({question_id, prediction} JSON lines)")

    def __init__(self):
        #: every ``question_id`` of the last loaded annotation file (video questions too), as the
        #: file holds it, in file order -- the converter wants an answer line for each of them
        self.question_ids: list = []

    def load(self, path: str) -> list[EvalSample]:
        data, questions = read_json_object_with_list(path, "questions")
        if "questions" not in data or "question_type" not in data:
            raise AnnotationError(f"{path}:1", "expected an object with 'questions' and 'question_type'")
        if not isinstance(data["questions"], list) or not isinstance(data["question_type"], dict):
            raise AnnotationError(f"{path}:1", "'questions' must be a list and 'question_type' an object")
        dimension_names = {int(v): k for k, v in data["question_type"].items()}
        samples, self.question_ids = [], []
        for index, (line, item) in enumerate(questions):
            where = f"{path}:{line} (questions[{index}])"
            require_fields(where, item, ("question_id", "data_type", "question", "answer", "question_type_id"))
            self.question_ids.append(item["question_id"])
            if item["data_type"] != "image":
                continue
            require_fields(where, item, ("data_id", "choice_a", "choice_b", "choice_c", "choice_d"))
            if item["answer"] not in LETTERS:
                raise AnnotationError(where, f"answer {item['answer']!r} is not one of A-D")
            options = {letter: item[f"choice_{letter.lower()}"] for letter in LETTERS}
            question = item["question"] + "".join(f"\n{letter}. {text}" for letter, text in options.items())
            dimension = int(item["question_type_id"])
            samples.append(EvalSample(
                id=str(item["question_id"]), question=question, media={"image": [item["data_id"]]},
                target=item["answer"],
                meta={"dimension": dimension_names.get(dimension, str(dimension)), "dimension_id": dimension,
                      "options": options, "question_id": item["question_id"]}, where=where))
        return samples

    def read_answer_file(self, path, samples):
        """LLaVA's answer lines or the leaderboard upload; answers to the video questions of the
        annotation file (not scored here) are set aside and noted."""
        from eval_suites.answers import AnswerRow, read_records

        records = read_records(path)
        if not records or not isinstance(records[0][1], dict) or "question_id" not in records[0][1]:
            return None
        key = "text" if "text" in records[0][1] else "prediction"
        image_ids = {s.id for s in samples}
        other = {str(q) for q in self.question_ids} - image_ids
        rows, set_aside = [], 0
        for where, item in records:
            require_fields(where, item, ("question_id", key))
            if str(item["question_id"]) in other:
                set_aside += 1
                continue
            if not isinstance(item[key], str):
                raise AnnotationError(where, f"field {key!r} must be text")
            rows.append(AnswerRow(where, str(item["question_id"]), item[key]))
        notes = [f"{set_aside} answers to questions not scored here (video questions, or cut by --limit) "
                 f"set aside"] if set_aside else []
        return f"SEED-Bench {{question_id, {key}}} lines", rows, notes

    def parse(self, answer: str, sample: EvalSample, mode: str) -> str | None:
        if mode == "official":
            return answer if answer in LETTERS else None
        return strict_choice(answer, sample.meta["options"])

    def score(self, samples, predictions, mode="official"):
        check_mode(mode)
        by_dimension: dict[str, list] = {}
        by_id: dict[int, str] = {}
        failures = 0
        for sample in samples:
            letter = self.parse(predictions.get(sample.id, ""), sample, mode)
            failures += letter is None
            by_dimension.setdefault(sample.meta["dimension"], []).append(letter == sample.target)
            by_id[sample.meta["dimension_id"]] = sample.meta["dimension"]
        hits = [h for v in by_dimension.values() for h in v]
        out = results_header(self, mode, samples, predictions, failures, len(samples))
        out["metrics"] = {"image_accuracy": mean_of(hits),
                          "dimensions": {by_id[i]: mean_of(by_dimension[by_id[i]]) for i in sorted(by_id)},
                          "dimension_sizes": {by_id[i]: len(by_dimension[by_id[i]]) for i in sorted(by_id)}}
        out["score"] = out["metrics"]["image_accuracy"]
        return out

    def write_official_files(self, samples, predictions, out_dir):
        """``seed_bench_answers.jsonl`` for LLaVA's ``convert_seed_for_submission.py
        --result-file`` and ``seed_bench_submission.jsonl`` (``{question_id, prediction}`` for
        the leaderboard, line for line what the converter's ``--result-upload-file`` holds):
        both carry the raw output -- no letter is extracted, so the leaderboard scores what
        ``official`` scores.

        The converter looks each annotation question up under ``int(question_id)`` (the
        question id itself when that fails, e.g. "v1738"), so the answers file writes
        ``question_id`` as that key -- a number for the numeric ids the annotation stores as
        strings -- and ``text`` = the raw output. Its upload step then needs a line for *every*
        question of the annotation file, video ones included, or it stops with an error; the
        questions not evaluated here (video questions, those cut by ``--limit``) get
        ``text: ""``, which it counts as wrong. Compare our score with its "image accuracy"
        line (equal when every image question was evaluated), not with "Total accuracy".
        """
        by_id = {s.id: s for s in samples}
        question_ids = self.question_ids or [s.meta.get("question_id", s.id) for s in samples]
        answers = [{"question_id": converter_key(qid), "text": predictions.get(str(qid), "")
                    if str(qid) in by_id else ""} for qid in question_ids]
        upload = [{"question_id": qid, "prediction": row["text"]} for qid, row in zip(question_ids, answers)]
        return [write_json_lines(os.path.join(out_dir, "seed_bench_answers.jsonl"), answers),
                write_json_lines(os.path.join(out_dir, "seed_bench_submission.jsonl"), upload)]


def converter_key(question_id):
    """The key LLaVA's ``convert_seed_for_submission.py`` looks an answer up under: the question
    id as a number when ``int()`` accepts it, else the id unchanged."""
    try:
        return int(question_id)
    except (TypeError, ValueError):
        return question_id
