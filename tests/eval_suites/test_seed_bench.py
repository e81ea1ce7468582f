"""SEED-Bench (image): per-dimension accuracy by hand, both modes."""

from __future__ import annotations

import json

import pytest

from eval_suites import AnnotationError, get_suite


def _question(qid, dim, answer, data_type="image"):
    return {"question_id": qid, "question_type_id": dim, "answer": answer, "data_type": data_type,
            "data_id": f"{qid}.jpg", "question": f"Question {qid}?", "choice_a": "One", "choice_b": "Two",
            "choice_c": "Three", "choice_d": "Four"}


@pytest.fixture
def seed_file(tmp_path):
    data = {"question_type": {"Scene Understanding": 1, "Instance Identity": 2, "Action Recognition": 10},
            "questions": [_question("1", 1, "A"), _question("2", 1, "B"), _question("3", 2, "C"),
                          _question("v4", 10, "A", "video"), _question("5", 2, "A")]}
    path = tmp_path / "SEED-Bench.json"
    path.write_text(json.dumps(data))
    return str(path)


ANSWERS = {"1": "A", "2": "B.", "3": "The answer is D"}  # "5" has no answer


def test_video_questions_are_left_out(seed_file):
    samples = get_suite("seed_bench").load(seed_file)
    assert [s.id for s in samples] == ["1", "2", "3", "5"]
    assert samples[0].question == "Question 1?\nA. One\nB. Two\nC. Three\nD. Four"


def test_official_mode_by_hand(seed_file):
    suite = get_suite("seed_bench")
    result = suite.score(suite.load(seed_file), ANSWERS, "official")
    assert result["metrics"]["dimensions"] == {"Scene Understanding": 0.5, "Instance Identity": 0.0}
    assert result["metrics"]["image_accuracy"] == 0.25 and result["parse_failures"] == 3


def test_strict_mode_by_hand(seed_file):
    suite = get_suite("seed_bench")
    result = suite.score(suite.load(seed_file), ANSWERS, "strict")
    assert result["metrics"]["dimensions"] == {"Scene Understanding": 1.0, "Instance Identity": 0.0}
    assert result["metrics"]["image_accuracy"] == 0.5 and result["parse_failures"] == 1


def test_official_files(seed_file, tmp_path):
    suite = get_suite("seed_bench")
    answers_path, upload_path = suite.write_official_files(suite.load(seed_file), ANSWERS, str(tmp_path))
    with open(upload_path) as f:
        upload = [json.loads(line) for line in f]
    assert upload[1] == {"question_id": "2", "prediction": "B"} and upload[3]["prediction"] == ""
    with open(answers_path) as f:
        assert json.loads(f.readline()) == {"question_id": "1", "text": "A"}


def test_bad_question_names_file_and_index(tmp_path):
    path = tmp_path / "SEED-Bench.json"
    path.write_text(json.dumps({"question_type": {}, "questions": [_question("1", 1, "E")]}))
    with pytest.raises(AnnotationError, match=r"SEED-Bench\.json: questions\[0\]"):
        get_suite("seed_bench").load(str(path))
    path.write_text('{"question_type": {},\n "questions": [,]}')
    with pytest.raises(AnnotationError, match=r"SEED-Bench\.json:2"):
        get_suite("seed_bench").load(str(path))
