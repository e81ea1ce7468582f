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

from eval_suites.base import (AnnotationError, EvalSample, Suite, check_mode, mean_of, read_json, require_fields,
                              results_header, write_json_lines)
from eval_suites.parsing import strict_choice

LETTERS = ("A", "B", "C", "D")


class SeedBench(Suite):
    name = "seed_bench"
    media_fields = ("image",)
    max_new_tokens = 128
    prompt_suffix = "\nAnswer with the option's letter from the given choices directly."

    def load(self, path: str) -> list[EvalSample]:
        data = read_json(path)
        if not isinstance(data, dict) or "questions" not in data or "question_type" not in data:
            raise AnnotationError(path, "expected an object with 'questions' and 'question_type'")
        dimension_names = {int(v): k for k, v in data["question_type"].items()}
        samples = []
        for index, item in enumerate(data["questions"]):
            where = f"{path}: questions[{index}]"
            require_fields(where, item, ("question_id", "data_type", "question", "answer", "question_type_id"))
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
                      "options": options}))
        return samples

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
        """``seed_bench_answers.jsonl`` (``{question_id, text}``, the input of LLaVA's converter)
        and ``seed_bench_submission.jsonl`` (``{question_id, prediction}`` for the leaderboard,
        the letter extracted robustly)."""
        answers = [{"question_id": s.id, "text": predictions.get(s.id, "")} for s in samples]
        upload = [{"question_id": s.id,
                   "prediction": self.parse(predictions.get(s.id, ""), s, "strict") or ""} for s in samples]
        return [write_json_lines(os.path.join(out_dir, "seed_bench_answers.jsonl"), answers),
                write_json_lines(os.path.join(out_dir, "seed_bench_submission.jsonl"), upload)]

