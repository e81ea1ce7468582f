"""MME: a miniature release folder, answers scored by hand in both modes."""

from __future__ import annotations

import os

import pytest

from eval_suites import AnnotationError, get_suite
from eval_suites.mme import official_mme_answer


def _pair(folder, stem, ext, lines, qa_dir=None):
    os.makedirs(folder, exist_ok=True)
    open(os.path.join(folder, stem + ext), "wb").close()
    text_dir = qa_dir or folder
    os.makedirs(text_dir, exist_ok=True)
    with open(os.path.join(text_dir, stem + ".txt"), "w") as f:
        f.write("\n".join(lines) + "\n")


@pytest.fixture
def mme_root(tmp_path):
    root = tmp_path / "MME_Benchmark_release_version"
    _pair(str(root / "existence"), "a", ".jpg", ["Is there a dog? Please answer yes or no.\tYes",
                                                  "Is there a cat? Please answer yes or no.\tNo"])
    _pair(str(root / "existence"), "b", ".png", ["Q1 Please answer yes or no.\tYes", "Q2 Please answer yes or no.\tNo"])
    _pair(str(root / "artwork" / "images"), "c", ".jpg", ["Q3\tYes", "Q4\tNo"],
          qa_dir=str(root / "artwork" / "questions_answers_YN"))
    _pair(str(root / "code_reasoning"), "d", ".png", ["Q5\tNo", "Q6\tYes"])
    return str(root)


ANSWERS = {
    "existence/a.jpg/0": "Yes",
    "existence/a.jpg/1": "not sure",          # official: first 4 chars hold "no" -> no (right); strict: unparsed
    "existence/b.png/0": "YES, it is",        # lower-cased -> yes
    "existence/b.png/1": "Nope",              # "no" in "nope" -> no
    "artwork/c.jpg/0": "The answer is yes",   # official: "the " -> other (wrong); strict: yes
    "artwork/c.jpg/1": "no",
    # code_reasoning answers missing
}


def test_official_parse():
    assert official_mme_answer("Yes") == "yes"
    assert official_mme_answer("not sure") == "no"
    assert official_mme_answer("There is no dog") == "other"
    assert official_mme_answer(" yes") == "yes"
    assert official_mme_answer("") == "other"


def test_official_mode_by_hand(mme_root):
    suite = get_suite("mme")
    samples = suite.load(mme_root)
    assert len(samples) == 8 and samples[0].media["image"][0].endswith(os.path.join("artwork", "images", "c.jpg"))
    result = suite.score(samples, ANSWERS, "official")
    subtasks = result["metrics"]["subtasks"]
    assert subtasks["existence"] == {"num_questions": 4, "accuracy": 1.0, "accuracy_plus": 1.0, "score": 200.0}
    assert subtasks["artwork"]["accuracy"] == 0.5 and subtasks["artwork"]["accuracy_plus"] == 0.0
    assert subtasks["artwork"]["score"] == 50.0
    assert subtasks["code_reasoning"]["score"] == 0.0
    assert result["metrics"]["perception"] == 250.0 and result["metrics"]["cognition"] == 0.0
    assert result["parse_failures"] == 3 and result["score"] == 250.0
    assert "OCR" in result["metrics"]["missing_perception_subtasks"]


def test_strict_mode_by_hand(mme_root):
    suite = get_suite("mme")
    result = suite.score(suite.load(mme_root), ANSWERS, "strict")
    subtasks = result["metrics"]["subtasks"]
    assert subtasks["existence"]["accuracy"] == 0.75 and subtasks["existence"]["accuracy_plus"] == 0.5
    assert subtasks["existence"]["score"] == 125.0
    assert subtasks["artwork"]["score"] == 200.0
    assert result["metrics"]["perception"] == 325.0 and result["parse_failures"] == 3


def test_results_folder_format(mme_root, tmp_path):
    suite = get_suite("mme")
    samples = suite.load(mme_root)
    answers = dict(ANSWERS, **{"artwork/c.jpg/1": "no\tand\nmore"})
    paths = suite.write_official_files(samples, answers, str(tmp_path / "out"))
    assert sorted(os.path.basename(p) for p in paths) == ["artwork.txt", "code_reasoning.txt", "existence.txt"]
    with open(tmp_path / "out" / "mme_results" / "existence.txt") as f:
        lines = f.read().splitlines()
    assert lines[:2] == ["a.jpg\tIs there a dog? Please answer yes or no.\tYes\tYes",
                         "a.jpg\tIs there a cat? Please answer yes or no.\tNo\tnot sure"]
    with open(tmp_path / "out" / "mme_results" / "artwork.txt") as f:
        assert f.read().splitlines()[1].split("\t") == ["c.jpg", "Q4", "No", "no and more"]


def test_malformed_line_names_file_and_line(mme_root):
    with open(os.path.join(mme_root, "existence", "b.txt"), "w") as f:
        f.write("Q1\tYes\nQ2 without an answer\n")
    with pytest.raises(AnnotationError, match=r"b\.txt:2"):
        get_suite("mme").load(mme_root)
