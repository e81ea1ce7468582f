"""POPE: hand-made answers with metrics worked out by hand, in both modes."""

from __future__ import annotations

import json

import pytest

from eval_suites import AnnotationError, get_suite
from eval_suites.pope import official_pope_answer


def _label_file(path, labels):
    with open(path, "w") as f:
        for i, label in enumerate(labels, start=1):
            f.write(json.dumps({"question_id": i, "image": f"COCO_val2014_{i:012d}.jpg",
                                "text": f"Is there a thing {i} in the image?", "label": label}) + "\n")
    return str(path)


@pytest.fixture
def pope_dir(tmp_path):
    _label_file(tmp_path / "coco_pope_random.json", ["yes", "yes", "yes", "no", "no", "no"])
    _label_file(tmp_path / "coco_pope_adversarial.json", ["yes", "no"])
    return str(tmp_path)


ANSWERS = {
    "random/1": "Yes.",                                   # yes / yes
    "random/2": "NO",                                     # official: case-sensitive -> yes
    "random/3": "",                                       # official: empty -> yes; strict: unparsed
    "random/4": "No, there is none.",                     # no / no
    "random/5": "Yes, there is a dog but not a cat.",     # official: 'not' -> no; strict: yes
    "random/6": "There is a cat",                         # official: yes; strict: unparsed
    "adversarial/1": "yes",
    "adversarial/2": "Nope",                              # official: yes; strict: no
}


def test_official_parse_quirks():
    assert official_pope_answer("NO") == "yes"
    assert official_pope_answer("Not at all") == "yes"
    assert official_pope_answer("Nope") == "yes"
    assert official_pope_answer("Yes. There is no dog") == "yes"
    assert official_pope_answer("yes\nno") == "yes"
    assert official_pope_answer("Yes, there is a car but not a bus.") == "no"
    assert official_pope_answer("") == "yes"
    assert official_pope_answer("no") == "no"


def test_official_mode_by_hand(pope_dir):
    suite = get_suite("pope")
    samples = suite.load(pope_dir)
    assert [s.meta["split"] for s in samples] == ["random"] * 6 + ["adversarial"] * 2  # random first
    result = suite.score(samples, ANSWERS, "official")
    assert result["mode"] == "official" and result["parse_failures"] == 0 and result["num_scored"] == 8
    random = result["metrics"]["splits"]["random"]
    assert (random["TP"], random["FP"], random["TN"], random["FN"]) == (3, 1, 2, 0)
    assert random["accuracy"] == pytest.approx(5 / 6)
    assert random["precision"] == pytest.approx(3 / 4)
    assert random["recall"] == 1.0
    assert random["f1"] == pytest.approx(6 / 7)
    assert random["yes_ratio"] == pytest.approx(4 / 6)
    adversarial = result["metrics"]["splits"]["adversarial"]
    assert adversarial["accuracy"] == 0.5 and adversarial["f1"] == pytest.approx(2 / 3)
    assert adversarial["yes_ratio"] == 1.0
    mean = result["metrics"]["mean_over_splits"]
    assert mean["accuracy"] == pytest.approx((5 / 6 + 1 / 2) / 2)
    assert result["score"] == pytest.approx((6 / 7 + 2 / 3) / 2)


def test_strict_mode_by_hand(pope_dir):
    suite = get_suite("pope")
    result = suite.score(suite.load(pope_dir), ANSWERS, "strict")
    assert result["mode"] == "strict" and result["parse_failures"] == 2
    random = result["metrics"]["splits"]["random"]
    assert (random["TP"], random["FP"], random["TN"], random["FN"], random["unparsed"]) == (1, 1, 1, 2, 2)
    assert random["accuracy"] == pytest.approx(2 / 6)
    assert random["precision"] == 0.5
    assert random["recall"] == pytest.approx(1 / 3)
    assert random["f1"] == pytest.approx(0.4)
    assert random["yes_ratio"] == pytest.approx(2 / 6)
    assert result["metrics"]["splits"]["adversarial"]["accuracy"] == 1.0


def test_missing_answers(pope_dir):
    suite = get_suite("pope")
    samples = suite.load(pope_dir)
    answers = {"random/1": "yes"}
    official = suite.score(samples, answers, "official")
    assert official["num_scored"] == 1 and official["metrics"]["splits"]["random"]["accuracy"] == 1.0
    strict = suite.score(samples, answers, "strict")
    assert strict["num_scored"] == 8 and strict["metrics"]["splits"]["random"]["accuracy"] == pytest.approx(1 / 6)


def _as_evaluate_py_scores(answers_path, labels_path):
    """RUCAIBox/POPE evaluate.py, restated: answers and labels zipped by position, the official
    parse on each answer, yes = positive. Returns (accuracy, precision, recall, f1, yes_ratio)."""
    with open(answers_path) as f:
        preds = [official_pope_answer(json.loads(line)["answer"]) for line in f]
    with open(labels_path) as f:
        labels = [json.loads(line)["label"] for line in f]
    pairs = list(zip(preds, labels))
    tp = sum(p == "yes" and g == "yes" for p, g in pairs)
    fp = sum(p == "yes" and g == "no" for p, g in pairs)
    tn = sum(p == "no" and g == "no" for p, g in pairs)
    fn = sum(p == "no" and g == "yes" for p, g in pairs)
    precision, recall = tp / (tp + fp), tp / (tp + fn)
    return ((tp + tn) / len(pairs), precision, recall, 2 * precision * recall / (precision + recall),
            preds.count("yes") / len(preds))


def test_official_answer_files_keep_label_order(pope_dir, tmp_path):
    suite = get_suite("pope")
    samples = suite.load(pope_dir)
    paths = suite.write_official_files(samples, ANSWERS, str(tmp_path / "out"))
    assert [p.rsplit("/", 1)[1] for p in paths] == ["pope_random_answers.jsonl", "pope_random_labels.json",
                                                    "pope_adversarial_answers.jsonl",
                                                    "pope_adversarial_labels.json"]
    with open(paths[0]) as f:
        rows = [json.loads(line) for line in f]
    assert [r["answer"] for r in rows] == [ANSWERS[f"random/{i}"] for i in range(1, 7)]
    assert rows[0]["question"] == "Is there a thing 1 in the image?"
    with open(paths[1]) as f, open(tmp_path / "coco_pope_random.json") as g:
        assert [json.loads(line) for line in f] == [json.loads(line) for line in g]


def test_official_files_leave_out_unanswered_questions(pope_dir, tmp_path):
    """A missing answer is skipped by official scoring; the files evaluate.py reads must agree
    (an "" answer would be read as "yes", and a dropped line would shift every later label)."""
    suite = get_suite("pope")
    samples = suite.load(pope_dir)
    answers = {k: v for k, v in ANSWERS.items() if k not in ("random/2", "random/3")}
    answers["random/4"] = "no"
    result = suite.score(samples, answers, "official")
    random = result["metrics"]["splits"]["random"]
    assert random["num_questions"] == 4 and random["unanswered"] == 2
    assert result["metrics"]["splits"]["adversarial"]["unanswered"] == 0
    # labels of 1, 4, 5, 6: yes no no no; parsed answers: yes no no yes
    assert (random["TP"], random["FP"], random["TN"], random["FN"]) == (1, 1, 2, 0)
    answers_path, labels_path = suite.write_official_files(samples, answers, str(tmp_path / "out"))[:2]
    with open(answers_path) as f:
        assert [json.loads(line)["answer"] for line in f] == ["Yes.", "no", ANSWERS["random/5"],
                                                              ANSWERS["random/6"]]
    with open(labels_path) as f:
        assert [json.loads(line)["question_id"] for line in f] == [1, 4, 5, 6]
    expected = tuple(random[k] for k in ("accuracy", "precision", "recall", "f1", "yes_ratio"))
    assert _as_evaluate_py_scores(answers_path, labels_path) == pytest.approx(expected)
    assert suite.write_official_files(samples, {"random/1": "yes"}, str(tmp_path / "one"))[-1].endswith(
        "pope_random_labels.json")  # a split without any answer gets no files


def test_malformed_line_names_file_and_line(tmp_path):
    path = tmp_path / "coco_pope_random.json"
    path.write_text('{"question_id": 1, "image": "a.jpg", "text": "q", "label": "yes"}\n{"question_id": 2,\n')
    with pytest.raises(AnnotationError, match=r"coco_pope_random\.json:2"):
        get_suite("pope").load(str(path))
    path.write_text('{"question_id": 1, "image": "a.jpg", "text": "q", "label": "Yes"}\n')
    with pytest.raises(AnnotationError, match=r"coco_pope_random\.json:1: label"):
        get_suite("pope").load(str(path))
