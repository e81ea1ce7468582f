"""AIR-Bench Foundation, speech tasks (9 tasks over 11 task×dataset folders).

Annotations: ``Foundation/Foundation_meta.json`` (a JSON list: ``path, question, choice_a..d``
-- C/D absent on two-way tasks -- ``answer_gt`` as option text, ``task_name``,
``dataset_name``, ``uniq_id``); audio at ``<media-root>/<task_name>_<dataset_name>/<path>``.
``subset="all"`` keeps every Foundation task. The prompt is the official
``Inference_Foundation.py`` instruction (a missing option prints as "None").

``official`` reproduces ``score_foundation.py``: strip, drop newlines; the letter is the first
character if it is one of A-D, else the second-to-last ("The answer is B."), else the answer
**fails and is left out of the denominator** ("b", "dog", "None", empty). "Answer: B" reads as
A. Accuracy = correct / parsed per ``task_name_dataset_name`` (the official script prints no
average; ``mean_task_accuracy`` here is the unweighted mean over tasks, the leaderboard's
presumed "Average"). A task with no parseable answer, where the official script crashes,
gets ``None``. Records missing from the answers are not scored, as in the official input.
``strict`` reads the choice with ``parsing.strict_choice`` (letter or option text) and counts
every question: unparseable or missing answers are wrong.
"""

from __future__ import annotations

import os

from eval_suites.base import (
    AnnotationError,
    EvalSample,
    Suite,
    check_mode,
    check_option_choice,
    iter_json_items,
    mean_of,
    ratio,
    require_fields,
    results_header,
    write_json_lines,
)
from eval_suites.parsing import strict_choice

SPEECH_TASKS = ("Speech_Grounding", "Spoken_Language_Identification", "Speaker_Gender_Recognition",
                "Speaker_Emotion_Recontion", "Speaker_Age_Prediction", "Speech_Entity_Reconition",
                "Speaker_Intent_Classification", "Speaker_Number_Verification", "Synthesized_Voice_Detection")
LETTERS = ("A", "B", "C", "D")
INSTRUCTION = ("Choose the most suitable answer from options A, B, C, and D to respond the question in next line, "
               "you may only choose A or B or C or D.")


def official_air_letter(response: str) -> str | None:
    predict = response.strip().replace("\n", "")
    if predict and predict[0] in LETTERS:
        return predict[0]
    if len(predict) >= 2 and predict[-2] in LETTERS:
        return predict[-2]
    return None


class AirBench(Suite):
    name = "air_bench"
    option_help = {"subset": "speech or all"}
    media_fields = ("speech",)
    max_new_tokens = 64
    prompt_suffix = ""  # the instruction comes first, as in the official prompt
    id_scheme = "UNIQ_ID, the record's uniq_id"
    answer_format = ("score_foundation.py's input (Foundation_result_modelx.jsonl: each meta record with "
                     "response, as JSON lines)")

    def __init__(self, subset: str = "speech"):
        """``subset``: speech (the 9 speech tasks, default) or all (every Foundation task)."""
        check_option_choice(self.name, "subset", subset, ("speech", "all"))
        self.subset = subset
        if subset != "speech":
            self.media_fields = ("audio", "speech")

    def load(self, path: str) -> list[EvalSample]:
        samples = []
        for where, item in iter_json_items(path):
            require_fields(where, item, ("path", "question", "choice_a", "choice_b", "answer_gt", "task_name",
                                         "dataset_name", "uniq_id"))
            if self.subset == "speech" and item["task_name"] not in SPEECH_TASKS:
                continue
            shown = {letter: item.get(f"choice_{letter.lower()}") for letter in LETTERS}
            options = {letter: text for letter, text in shown.items() if text is not None}
            answer = next((letter for letter, text in options.items() if text == item["answer_gt"]), None)
            if answer is None:  # score_foundation.py exits here
                raise AnnotationError(where, f"answer_gt {item['answer_gt']!r} matches no choice")
            question = "\n".join([INSTRUCTION, item["question"]] + [f"{k}. {v}" for k, v in shown.items()])
            folder = f"{item['task_name']}_{item['dataset_name']}"
            media_field = "speech" if item["task_name"] in SPEECH_TASKS else "audio"
            samples.append(EvalSample(
                id=str(item["uniq_id"]), question=question, media={media_field: [f"{folder}/{item['path']}"]},
                target=answer, meta={"task": folder, "task_name": item["task_name"], "options": options,
                                     "record": item}, where=where))
        return samples

    def read_answer_file(self, path, samples):
        """``score_foundation.py``'s input: meta records with ``uniq_id`` and ``response``."""
        from eval_suites.answers import AnswerRow, read_records

        records = read_records(path)
        if not records or not isinstance(records[0][1], dict) or "response" not in records[0][1]:
            return None
        rows = []
        for where, item in records:
            require_fields(where, item, ("uniq_id", "response"))
            if not isinstance(item["response"], str):
                raise AnnotationError(where, "field 'response' must be text")
            rows.append(AnswerRow(where, str(item["uniq_id"]), item["response"]))
        return "AIR-Bench result lines", rows, []

    def score(self, samples, predictions, mode="official"):
        check_mode(mode)
        tasks: dict[str, dict] = {}
        failures = scored = 0
        for sample in samples:
            response = predictions.get(sample.id)
            if response is None and mode == "official":
                continue
            scored += 1
            if mode == "official":
                letter = official_air_letter(response)
            else:
                letter = strict_choice(response or "", sample.meta["options"])
            task = tasks.setdefault(sample.meta["task"], {"num": 0, "parsed": 0, "correct": 0})
            task["num"] += 1
            if letter is None:
                failures += 1
                if mode == "official":
                    continue  # dropped from the denominator
            else:
                task["parsed"] += 1
            task["correct"] += letter == sample.target
        for task in tasks.values():
            task["accuracy"] = ratio(task["correct"], task["parsed"] if mode == "official" else task["num"])
        correct = sum(t["correct"] for t in tasks.values())
        denominator = scored - failures if mode == "official" else scored
        accuracies = [t["accuracy"] for t in tasks.values()]
        out = results_header(self, mode, samples, predictions, failures, denominator)
        out["metrics"] = {
            "accuracy": ratio(correct, denominator), "total_sum": denominator, "fail_num": failures,
            "mean_task_accuracy": mean_of(accuracies) if None not in accuracies else None,
            "tasks": dict(sorted(tasks.items()))}
        out["score"] = out["metrics"]["mean_task_accuracy"]
        return out

    def write_official_files(self, samples, predictions, out_dir):
        """``Foundation_result_modelx.jsonl`` (the name ``score_foundation.py`` opens): each
        answered record with ``response``."""
        rows = [dict(s.meta["record"], response=predictions[s.id]) for s in samples if s.id in predictions]
        return [write_json_lines(os.path.join(out_dir, "Foundation_result_modelx.jsonl"), rows)]
