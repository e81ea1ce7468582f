"""POPE (object hallucination on COCO val2014): yes/no questions in three splits.

Annotations: the official label files ``coco_pope_{random,popular,adversarial}.json`` (JSON
lines despite the name: ``{question_id, image, text, label}``); pass one file or the folder
holding them. Each split is scored separately (accuracy, precision, recall, F1 with "yes" as
the positive class, and the model's yes-ratio), plus the mean over splits.

``official`` reproduces RUCAIBox/POPE ``evaluate.py``: keep the text before the first '.',
delete commas, split on single spaces; the tokens ``No``, ``no`` or ``not`` (case-sensitive)
mean "no", anything else -- "NO", "Nope", an empty answer -- means "yes". Every answer
parses, so nothing is dropped; a sample with no answer at all is left out (the official
script zips answers with labels by position and has no notion of a missing one; given an
empty answer it would read "yes"). The files written for it agree with this: per split,
``pope_<split>_answers.jsonl`` holds the answered questions only and
``pope_<split>_labels.json`` the matching label records, in the same order (the official
file's records when every question has an answer) -- ``evaluate.py`` run on the pair
prints the numbers of ``results_official.json``; each split's ``unanswered`` count says how
many were left out.
``strict`` reads yes/no case-insensitively from the first word (see ``parsing.strict_yes_no``);
an answer that is neither, or missing, counts against accuracy and recall.
"""

from __future__ import annotations

import glob
import os
import re

from eval_suites.base import (
    AnnotationError,
    AnnotationFileNotFoundError,
    EvalSample,
    Suite,
    check_mode,
    iter_json_lines,
    mean_of,
    ratio,
    require_fields,
    results_header,
    write_json_lines,
)
from eval_suites.parsing import strict_yes_no

SPLITS = ("random", "popular", "adversarial")


def official_pope_answer(text: str) -> str:
    """``evaluate.py``'s parse: case-sensitive 'No' / 'no' / 'not' tokens in the first sentence."""
    first_sentence = text.split(".")[0]
    tokens = first_sentence.replace(",", "").split(" ")
    return "no" if ("No" in tokens or "no" in tokens or "not" in tokens) else "yes"


def split_name(path: str) -> str:
    match = re.search(r"pope_([A-Za-z]+)\.jsonl?$", os.path.basename(path))
    return match.group(1) if match else os.path.splitext(os.path.basename(path))[0]


def label_files(path: str) -> list[str]:
    if not os.path.isdir(path):
        return [path]
    found = {split_name(p): p for p in glob.glob(os.path.join(path, "*pope_*.json*"))}
    files = [found.pop(s) for s in SPLITS if s in found] + [found[k] for k in sorted(found)]
    if not files:
        raise AnnotationFileNotFoundError(path, "no POPE label files (coco_pope_<split>.json) in this folder")
    return files


def split_metrics(pairs: list[tuple[str, str | None]]) -> dict:
    """pairs of (label, predicted 'yes' / 'no' / None for unparsed)."""
    tp = sum(1 for label, pred in pairs if label == "yes" and pred == "yes")
    fp = sum(1 for label, pred in pairs if label == "no" and pred == "yes")
    tn = sum(1 for label, pred in pairs if label == "no" and pred == "no")
    fn = sum(1 for label, pred in pairs if label == "yes" and pred != "yes")
    precision, recall = ratio(tp, tp + fp), ratio(tp, tp + fn)
    f1 = (2 * precision * recall / (precision + recall)
          if precision is not None and recall is not None and precision + recall else None)
    return {"TP": tp, "FP": fp, "TN": tn, "FN": fn, "unparsed": sum(1 for _, p in pairs if p is None),
            "num_questions": len(pairs), "accuracy": ratio(tp + tn, len(pairs)), "precision": precision,
            "recall": recall, "f1": f1, "yes_ratio": ratio(sum(1 for _, p in pairs if p == "yes"), len(pairs))}


class Pope(Suite):
    name = "pope"
    media_fields = ("image",)
    max_new_tokens = 128  # lmms-eval's pope and LLaVA-1.5's model_vqa_loader
    prompt_suffix = "\nAnswer the question using a single word or phrase."
    id_scheme = "SPLIT/QUESTION_ID, SPLIT from the label file's name coco_pope_SPLIT.json (e.g. random/1)"
    answer_format = ("POPE's evaluate.py answer file ({question, answer} JSON lines in label-file order, paired with "
                     "the label file by position; with several splits in --data, the split named in its file name)")

    def load(self, path: str) -> list[EvalSample]:
        samples = []
        for file in label_files(path):
            split = split_name(file)
            for position, (where, item) in enumerate(iter_json_lines(file)):
                require_fields(where, item, ("question_id", "image", "text", "label"))
                if item["label"] not in ("yes", "no"):
                    raise AnnotationError(where, f"label must be 'yes' or 'no', got {item['label']!r}")
                samples.append(EvalSample(
                    id=f"{split}/{item['question_id']}", question=item["text"], media={"image": [item["image"]]},
                    target=item["label"], meta={"split": split, "position": position, "record": item},
                    where=where))
        return samples

    def read_answer_file(self, path, samples):
        """``evaluate.py``'s answer file: ``{question, answer}`` lines, the n-th answering the
        n-th question of one split's label file (it zips them by position). Lines past the end of
        the split match no sample; a question text that differs from the label file's is noted
        (label files of other POPE versions differ in wording, not in labels)."""
        from eval_suites.answers import AnswerRow

        records = list(iter_json_lines(path))
        if not records or not isinstance(records[0][1], dict) or not {"question", "answer"} <= set(records[0][1]):
            return None
        splits = list(dict.fromkeys(s.meta["split"] for s in samples))
        named = [split for split in splits if re.search(rf"(^|[^A-Za-z]){split}([^A-Za-z]|$)", os.path.basename(path))]
        if len(splits) == 1:
            split = splits[0]
        elif len(named) == 1:
            split = named[0]
        else:
            raise AnnotationError(path, f"POPE's answer file pairs with one label file by position, and --data holds "
                                        f"the splits {', '.join(splits)}: name the split in the answer file's name "
                                        f"(e.g. coco_pope_{splits[0]}_answers.jsonl) or give that split's label "
                                        f"file as --data")
        questions = [s for s in samples if s.meta["split"] == split]
        rows, reworded = [], 0
        for position, (where, item) in enumerate(records):
            require_fields(where, item, ("answer",))
            if not isinstance(item["answer"], str):
                raise AnnotationError(where, "field 'answer' must be text")
            if position < len(questions):
                sample_id = questions[position].id
                reworded += item.get("question", questions[position].question) != questions[position].question
            else:
                sample_id = f"{split}/(line {position + 1}, past the {len(questions)} questions of the split)"
            rows.append(AnswerRow(where, sample_id, item["answer"]))
        notes = [f"paired by position with the {split} split"]
        if reworded:
            notes.append(f"{reworded} answers carry a question worded differently from the label file's")
        return "POPE evaluate.py answer file", rows, notes

    def score(self, samples, predictions, mode="official"):
        check_mode(mode)
        by_split: dict[str, list] = {}
        unanswered: dict[str, int] = {}
        failures = scored = 0
        for sample in samples:
            answer = predictions.get(sample.id)
            if answer is None:
                unanswered[sample.meta["split"]] = unanswered.get(sample.meta["split"], 0) + 1
            if answer is None and mode == "official":
                continue
            pred = official_pope_answer(answer) if mode == "official" else strict_yes_no(answer or "")
            failures += pred is None
            scored += 1
            by_split.setdefault(sample.meta["split"], []).append((sample.target, pred))
        splits = {name: dict(split_metrics(pairs), unanswered=unanswered.get(name, 0))
                  for name, pairs in by_split.items()}
        keys = ("accuracy", "precision", "recall", "f1", "yes_ratio")
        mean = {k: mean_of([m[k] for m in splits.values()]) if all(m[k] is not None for m in splits.values())
                else None for k in keys}
        out = results_header(self, mode, samples, predictions, failures, scored)
        out["metrics"] = {"mean_over_splits": mean, "splits": splits}
        out["score"] = mean["f1"]
        return out

    def write_official_files(self, samples, predictions, out_dir):
        """Per split with at least one answer, the pair to give ``evaluate.py`` (it zips answers
        with labels by position): ``pope_<split>_answers.jsonl`` (``{question, answer}`` lines in
        label-file order) and ``pope_<split>_labels.json`` (the label records of those same
        questions, verbatim). Questions without an answer are left out of both files -- written
        as "" they would be read as "yes" -- so the pair scores exactly as ``official`` does."""
        paths = []
        for split in dict.fromkeys(s.meta["split"] for s in samples):
            answered = [s for s in samples if s.meta["split"] == split and s.id in predictions]
            if not answered:
                continue  # nothing to score; evaluate.py would divide by zero
            answers = [{"question": s.question, "answer": predictions[s.id]} for s in answered]
            paths.append(write_json_lines(os.path.join(out_dir, f"pope_{split}_answers.jsonl"), answers))
            paths.append(write_json_lines(os.path.join(out_dir, f"pope_{split}_labels.json"),
                                          [s.meta["record"] for s in answered]))
        return paths
