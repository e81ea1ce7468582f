"""MME: yes/no questions, two per image, in 14 subtasks (10 perception, 4 cognition).

Annotations: the ``MME_Benchmark_release_version`` folder. ``artwork``, ``celebrity``,
``landmark``, ``posters`` and ``scene`` keep ``images/`` + ``questions_answers_YN/<stem>.txt``;
the others keep ``<stem>.jpg|png`` beside ``<stem>.txt``. Each txt holds two lines
``question<TAB>Yes|No``. Per subtask: accuracy over questions, accuracy+ (images with both
questions right) and score = 100·acc + 100·acc+; perception = sum of the 10 perception
scores (max 2000), cognition = sum of the 4 cognition scores (max 800).

``official`` reproduces ``eval_tool/calculation.py``: lower-case, no strip; an exact "yes" /
"no" is taken as is, otherwise only the first four characters are looked at -- "yes" in them
means yes, else "no" in them means no ("not sure" -> no, "Nope" -> no), else the answer is
"other" and wrong. acc+ pairs questions by position (consecutive lines). Responses are
first flattened as they are in the results files (tabs and newlines become spaces). A
missing answer is scored as an empty one ("other").
``strict`` reads yes/no with ``parsing.strict_yes_no`` and pairs questions by image name.
"""

from __future__ import annotations

import os

from eval_suites.base import (
    AnnotationError,
    AnnotationFileNotFoundError,
    EvalSample,
    Suite,
    check_mode,
    mean_of,
    results_header,
)
from eval_suites.parsing import strict_yes_no

PERCEPTION = ("existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark",
              "artwork", "OCR")
COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")
IMAGE_EXTENSIONS = (".jpg", ".png", ".jpeg", ".JPG", ".PNG", ".JPEG")


def official_mme_answer(text: str) -> str:
    pred = text.lower()
    if pred in ("yes", "no"):
        return pred
    prefix = pred[:4]
    if "yes" in prefix:
        return "yes"
    if "no" in prefix:
        return "no"
    return "other"


def flatten_response(text: str) -> str:
    """A response as it must appear in a results line (one line, four tab-separated fields)."""
    return text.replace("\t", " ").replace("\r", " ").replace("\n", " ")


def _question_files(subtask_dir: str) -> tuple[str, str, list[str]]:
    """(folder of the txt files, folder of the images, txt names)."""
    qa_dir = os.path.join(subtask_dir, "questions_answers_YN")
    if os.path.isdir(qa_dir):
        text_dir, image_dir = qa_dir, os.path.join(subtask_dir, "images")
    else:
        text_dir = image_dir = subtask_dir
    return text_dir, image_dir, sorted(n for n in os.listdir(text_dir) if n.endswith(".txt"))


class Mme(Suite):
    name = "mme"
    media_fields = ("image",)
    max_new_tokens = 16      # only the first four characters are ever read
    prompt_suffix = ""       # the questions already end in "Please answer yes or no."
    id_scheme = ("SUBTASK/IMAGE/N, N = 0 or 1 the question's line in the image's txt file "
                 "(e.g. existence/000000006040.jpg/0)")
    answer_format = ("MME's results folder (one SUBTASK.txt per subtask, lines "
                     "image<TAB>question<TAB>answer<TAB>response, as calculation.py reads; it holds the ground "
                     "truth, so --data is optional)")

    def load(self, path: str) -> list[EvalSample]:
        if not os.path.isdir(path):
            raise AnnotationFileNotFoundError(path, "expected the MME_Benchmark_release_version folder")
        samples = []
        for subtask in sorted(os.listdir(path)):
            subtask_dir = os.path.join(path, subtask)
            if not os.path.isdir(subtask_dir):
                continue
            text_dir, image_dir, names = _question_files(subtask_dir)
            for name in names:
                samples += self._read_pair(subtask, os.path.join(text_dir, name), image_dir)
        if not samples:
            raise AnnotationFileNotFoundError(path, "no MME subtask folders with question files")
        return samples

    def _read_pair(self, subtask: str, txt_path: str, image_dir: str) -> list[EvalSample]:
        stem = os.path.splitext(os.path.basename(txt_path))[0]
        image = next((stem + ext for ext in IMAGE_EXTENSIONS if os.path.exists(os.path.join(image_dir, stem + ext))),
                     None)
        if image is None:
            raise AnnotationError(txt_path, f"no image {stem}.jpg/.png in {image_dir}")
        image_path = os.path.abspath(os.path.join(image_dir, image))  # the images live in the data folder
        samples = []
        with open(txt_path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                fields = line.rstrip("\n").split("\t")
                if len(fields) != 2 or fields[1].strip() not in ("Yes", "No"):
                    raise AnnotationError(f"{txt_path}:{lineno}", "expected 'question<TAB>Yes|No'")
                samples.append(EvalSample(
                    id=f"{subtask}/{image}/{len(samples)}", question=fields[0], media={"image": [image_path]},
                    target=fields[1].strip(), meta={"subtask": subtask, "image_name": image},
                    where=f"{txt_path}:{lineno}"))
        if len(samples) != 2:
            raise AnnotationError(txt_path, f"expected 2 questions per image, found {len(samples)}")
        return samples

    # ------------------------------------------------------------------ results folder
    @staticmethod
    def _results_lines(path: str):
        """``(where, subtask, image, question, answer, response)`` of every line of a results
        folder, in file order."""
        if not os.path.isdir(path):
            return None
        names = sorted(n for n in os.listdir(path) if n.endswith(".txt"))
        if not names:
            raise AnnotationError(path, "an MME results folder holds SUBTASK.txt files; this folder has none")
        for name in names:
            txt_path = os.path.join(path, name)
            with open(txt_path, encoding="utf-8") as f:
                for lineno, line in enumerate(f, start=1):
                    if not line.strip():
                        continue
                    fields = line.rstrip("\n").split("\t")
                    where = f"{txt_path}:{lineno}"
                    if len(fields) != 4:
                        raise AnnotationError(where, f"expected image<TAB>question<TAB>answer<TAB>response, found "
                                                     f"{len(fields)} tab-separated fields")
                    if fields[2].strip().lower() not in ("yes", "no"):
                        raise AnnotationError(where, f"the answer field (3rd) must be Yes or No, got {fields[2]!r}")
                    yield where, os.path.splitext(name)[0], *fields

    def samples_from_answers(self, path):
        """A results folder holds each question's ground truth: samples built from it alone
        (no image folder needed), in file order, so that ``official`` pairs lines as
        ``calculation.py`` does."""
        if not os.path.isdir(path):
            return None
        samples, seen = [], {}
        for where, subtask, image, question, answer, _ in self._results_lines(path):
            position = seen[(subtask, image)] = seen.get((subtask, image), -1) + 1
            samples.append(EvalSample(id=f"{subtask}/{image}/{position}", question=question, media={},
                                      target=answer.strip().capitalize(), where=where,
                                      meta={"subtask": subtask, "image_name": image}))
        return samples

    def read_answer_file(self, path, samples):
        """A results folder: each line answers the sample of its subtask, image and question
        (the position in the pair when the question text differs)."""
        from eval_suites.answers import AnswerRow

        if not os.path.isdir(path):
            return None
        by_question = {(s.meta["subtask"], s.meta["image_name"], s.question): s.id for s in samples}
        rows, seen = [], {}
        for where, subtask, image, question, _, response in self._results_lines(path):
            position = seen[(subtask, image)] = seen.get((subtask, image), -1) + 1
            sample_id = by_question.get((subtask, image, question), f"{subtask}/{image}/{position}")
            rows.append(AnswerRow(where, sample_id, response))
        return "MME results folder", rows, []

    def score(self, samples, predictions, mode="official"):
        check_mode(mode)
        by_subtask: dict[str, list] = {}
        failures = 0
        for sample in samples:
            answer = predictions.get(sample.id, "")
            pred = official_mme_answer(flatten_response(answer)) if mode == "official" else strict_yes_no(answer)
            failures += pred in ("other", None)
            by_subtask.setdefault(sample.meta["subtask"], []).append(
                (sample.meta["image_name"], pred == sample.target.lower()))
        subtasks = {}
        for subtask, rows in by_subtask.items():
            hits = [hit for _, hit in rows]
            if mode == "official":  # consecutive lines form an image's pair
                pairs = [hits[i:i + 2] for i in range(0, len(hits), 2)]
            else:
                grouped: dict[str, list] = {}
                for image, hit in rows:
                    grouped.setdefault(image, []).append(hit)
                pairs = list(grouped.values())
            acc, acc_plus = mean_of(hits), mean_of([all(p) for p in pairs])
            subtasks[subtask] = {"num_questions": len(hits), "accuracy": acc, "accuracy_plus": acc_plus,
                                 "score": 100 * acc + 100 * acc_plus}
        out = results_header(self, mode, samples, predictions, failures, len(samples))
        out["metrics"] = {
            "perception": sum(subtasks[s]["score"] for s in PERCEPTION if s in subtasks),
            "cognition": sum(subtasks[s]["score"] for s in COGNITION if s in subtasks),
            "missing_perception_subtasks": [s for s in PERCEPTION if s not in subtasks],
            "subtasks": subtasks,
        }
        out["score"] = out["metrics"]["perception"]
        return out

    def write_official_files(self, samples, predictions, out_dir):
        """``<out_dir>/mme_results/<subtask>.txt`` for ``calculation.py --results_dir``: lines
        ``image<TAB>question<TAB>gt<TAB>response``, an image's two questions adjacent."""
        folder = os.path.join(out_dir, "mme_results")
        os.makedirs(folder, exist_ok=True)
        lines: dict[str, list[str]] = {}
        for s in samples:
            lines.setdefault(s.meta["subtask"], []).append(
                "\t".join([s.meta["image_name"], s.question, s.target, flatten_response(predictions.get(s.id, ""))]))
        paths = []
        for subtask, rows in lines.items():
            paths.append(os.path.join(folder, f"{subtask}.txt"))
            with open(paths[-1], "w", encoding="utf-8") as f:
                f.write("\n".join(rows) + "\n")
        return paths
