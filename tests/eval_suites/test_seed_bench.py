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


def _as_the_converter_reads(answers_path, annotation_path):
    """LLaVA's convert_seed_for_submission.py contract, restated: answers are keyed by the
    file's ``question_id``; each annotation question is looked up under ``int(question_id)``
    (the id itself when that fails) and counts as right iff ``text`` equals its answer; the
    upload step needs every annotation question to be found. Returns (image accuracy, upload)."""
    with open(answers_path) as f:
        results = {row["question_id"]: row for row in map(json.loads, f)}
    with open(annotation_path) as f:
        questions = json.load(f)["questions"]
    hits = []
    for q in questions:
        try:
            key = int(q["question_id"])
        except ValueError:
            key = q["question_id"]
        if q["data_type"] == "image":
            hits.append(key in results and results[key]["text"] == q["answer"])
    upload = []
    for q in questions:  # raises KeyError / ValueError where the real script would stop
        qid = q["question_id"]
        row = results[qid] if qid in results else results[int(qid)]
        upload.append({"question_id": qid, "prediction": row["text"]})
    return sum(hits) / len(hits), upload


def test_official_files(seed_file, tmp_path):
    suite = get_suite("seed_bench")
    samples = suite.load(seed_file)
    answers_path, upload_path = suite.write_official_files(samples, ANSWERS, str(tmp_path))
    with open(upload_path) as f:
        upload = [json.loads(line) for line in f]
    assert upload[1] == {"question_id": "2", "prediction": "B."} and upload[3]["prediction"] == ""  # raw
    with open(answers_path) as f:
        rows = [json.loads(line) for line in f]
    # numeric ids as numbers (the converter's int() key), "v4" as is, every annotation question present
    assert rows == [{"question_id": 1, "text": "A"}, {"question_id": 2, "text": "B."},
                    {"question_id": 3, "text": "The answer is D"}, {"question_id": "v4", "text": ""},
                    {"question_id": 5, "text": ""}]
    accuracy, converted = _as_the_converter_reads(answers_path, seed_file)
    assert accuracy == suite.score(samples, ANSWERS, "official")["metrics"]["image_accuracy"] == 0.25
    assert [r["question_id"] for r in converted] == ["1", "2", "3", "v4", "5"]
    assert upload == converted  # the converter's own upload file


def test_official_files_with_integer_ids_and_a_limit(tmp_path):
    """Annotation ids stored as numbers stay numbers; questions cut by --limit still get a line."""
    data = {"question_type": {"Scene Understanding": 1},
            "questions": [_question(11, 1, "A"), _question(12, 1, "B"), _question(13, 1, "C")]}
    path = tmp_path / "SEED-Bench.json"
    path.write_text(json.dumps(data))
    suite = get_suite("seed_bench")
    samples = suite.load(str(path))[:2]
    assert [s.id for s in samples] == ["11", "12"]
    answers_path, upload_path = suite.write_official_files(samples, {"11": "A", "12": "C"}, str(tmp_path / "o"))
    with open(answers_path) as f:
        assert [json.loads(line) for line in f] == [{"question_id": 11, "text": "A"},
                                                    {"question_id": 12, "text": "C"},
                                                    {"question_id": 13, "text": ""}]
    accuracy, _ = _as_the_converter_reads(answers_path, str(path))
    assert accuracy == pytest.approx(1 / 3)
    with open(upload_path) as f:
        assert json.loads(f.readline()) == {"question_id": 11, "prediction": "A"}


def test_upload_file_holds_the_raw_output(tmp_path):
    """As the converter's upload file: the output as generated, no letter extracted ("(A)" stays)."""
    data = {"question_type": {"Scene Understanding": 1}, "questions": [_question("11", 1, "A")]}
    path = tmp_path / "SEED-Bench.json"
    path.write_text(json.dumps(data))
    suite = get_suite("seed_bench")
    _, upload_path = suite.write_official_files(suite.load(str(path)), {"11": "(A) a cat"}, str(tmp_path / "o"))
    with open(upload_path) as f:
        assert json.loads(f.readline()) == {"question_id": "11", "prediction": "(A) a cat"}


def test_bad_question_names_file_line_and_index(tmp_path):
    path = tmp_path / "SEED-Bench.json"
    good, bad = json.dumps(_question("1", 1, "A")), json.dumps(_question("2", 1, "E"))
    path.write_text('{"question_type": {},\n "questions": [\n  ' + good + ',\n\n  ' + bad + '\n]}\n')
    with pytest.raises(AnnotationError, match=r"SEED-Bench\.json:5 \(questions\[1\]\): answer 'E'"):
        get_suite("seed_bench").load(str(path))
    path.write_text('{"question_type": {},\n "questions": [,]}')
    with pytest.raises(AnnotationError, match=r"SEED-Bench\.json:2"):
        get_suite("seed_bench").load(str(path))
    path.write_text('{"question_type": {}, "questions": [' + good + ']}\n{}')
    with pytest.raises(AnnotationError, match=r"SEED-Bench\.json:2: invalid JSON: extra data"):
        get_suite("seed_bench").load(str(path))
