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


def test_official_answer_files_keep_label_order(pope_dir, tmp_path):
    suite = get_suite("pope")
    samples = suite.load(pope_dir)
    paths = suite.write_official_files(samples, ANSWERS, str(tmp_path / "out"))
    with open(paths[0]) as f:
        rows = [json.loads(line) for line in f]
    assert [r["answer"] for r in rows] == [ANSWERS[f"random/{i}"] for i in range(1, 7)]
    assert rows[0]["question"] == "Is there a thing 1 in the image?"


def test_malformed_line_names_file_and_line(tmp_path):
    path = tmp_path / "coco_pope_random.json"
    path.write_text('{"question_id": 1, "image": "a.jpg", "text": "q", "label": "yes"}\n{"question_id": 2,\n')
    with pytest.raises(AnnotationError, match=r"coco_pope_random\.json:2"):
        get_suite("pope").load(str(path))
    path.write_text('{"question_id": 1, "image": "a.jpg", "text": "q", "label": "Yes"}\n')
    with pytest.raises(AnnotationError, match=r"coco_pope_random\.json:1: label"):
        get_suite("pope").load(str(path))
