"""MMAU test-mini speech subset: the official string match, both modes."""

from __future__ import annotations

import json

import pytest

from eval_suites import AnnotationError, get_suite
from eval_suites.mmau import official_string_match, submitted_text

SARCASM = ["Complimenting the organizational system.", "Praising the coffee table.",
           "Exaggerates messiness to absurd extent.", "Suggesting a real garage sale."]


def _record(rid, choices, answer, difficulty, task="speech"):
    return {"id": rid, "audio_id": f"./test-mini-audios/{rid}.wav", "question": f"Question {rid}?",
            "answer": answer, "choices": choices, "dataset": "mustard", "task": task, "category": "Reasoning",
            "sub-category": "Dissonant Emotion Interpretation", "difficulty": difficulty, "split": "test-mini"}


@pytest.fixture
def mmau_file(tmp_path):
    records = [_record("r1", SARCASM, SARCASM[2], "easy"), _record("r2", SARCASM, SARCASM[2], "hard"),
               _record("r3", ["yes", "no"], "no", "easy"), _record("r4", SARCASM, SARCASM[0], "hard"),
               _record("s1", ["a", "b"], "a", "easy", task="sound")]
    path = tmp_path / "mmau-test-mini.json"
    path.write_text(json.dumps(records))
    return str(path)


ANSWERS = {"r1": "C", "r2": "The answer is Exaggerates messiness to absurd extent.", "r3": "No"}  # r4 missing


def test_string_match_rules():
    assert official_string_match(SARCASM[2], SARCASM[2], SARCASM)
    assert not official_string_match(SARCASM[2], "C", SARCASM)                   # a bare letter scores 0
    assert official_string_match(SARCASM[2], "(C) Exaggerates messiness to absurd extent", SARCASM)
    assert not official_string_match(SARCASM[2], "", SARCASM)
    assert submitted_text("(C)", SARCASM) == SARCASM[2] and submitted_text("E", SARCASM) == "E"


def test_official_mode_by_hand(mmau_file):
    suite = get_suite("mmau")
    samples = suite.load(mmau_file)
    assert [s.id for s in samples] == ["r1", "r2", "r3", "r4"] and samples[0].media == {
        "speech": ["./test-mini-audios/r1.wav"]}
    result = suite.score(samples, ANSWERS, "official")
    # r1's bare letter "C" is wrong, as in evaluation.py; r2 fails on "the", a word of a wrong
    # choice; r4 has no output and is skipped
    assert result["num_scored"] == 3 and result["metrics"]["accuracy"] == pytest.approx(1 / 3)
    assert result["metrics"]["difficulty"] == {"easy": 0.5, "hard": 0.0}
    assert result["metrics"]["task"] == {"speech": pytest.approx(1 / 3)}


def test_official_mode_scores_bare_letters_as_the_official_script(mmau_file, tmp_path):
    """evaluation.py scores model_output as it is: "C", "(C)" and "C." name no answer word, so
    they are wrong (the official file holds them raw); the letter mapping is an option, off by
    default, recorded when on."""
    letters = {"r1": "C", "r2": "(C)", "r3": "B.", "r4": "A"}  # each the right option's letter
    suite = get_suite("mmau")
    samples = suite.load(mmau_file)
    assert suite.score(samples, letters, "official")["metrics"]["accuracy"] == 0.0
    assert suite.score(samples, letters, "strict")["metrics"]["accuracy"] == 1.0
    [path] = suite.write_official_files(samples, letters, str(tmp_path / "raw"))
    with open(path) as f:
        assert {r["id"]: r["model_output"] for r in json.load(f)} == letters
    mapped = get_suite("mmau", letter_to_text=True)
    assert mapped.options == {"letter_to_text": True}
    assert mapped.score(samples, letters, "official")["metrics"]["accuracy"] == 1.0
    [path] = mapped.write_official_files(samples, letters, str(tmp_path / "mapped"))
    with open(path) as f:
        rows = json.load(f)
    assert rows[0]["model_output"] == SARCASM[2] and rows[0]["raw_output"] == "C"


def test_strict_mode_by_hand(mmau_file):
    suite = get_suite("mmau")
    result = suite.score(suite.load(mmau_file), ANSWERS, "strict")
    assert result["num_scored"] == 4 and result["metrics"]["accuracy"] == 0.75 and result["parse_failures"] == 1
    assert result["metrics"]["difficulty"] == {"easy": 1.0, "hard": 0.5}


def test_official_file_has_model_output_text(mmau_file, tmp_path):
    suite = get_suite("mmau")
    [path] = suite.write_official_files(suite.load(mmau_file), ANSWERS, str(tmp_path))
    with open(path) as f:
        rows = json.load(f)
    assert [r["id"] for r in rows] == ["r1", "r2", "r3"] and rows[0]["model_output"] == "C"  # raw


def test_malformed_record_names_file(tmp_path):
    path = tmp_path / "mmau.json"
    path.write_text('[\n  {"id": "ok", "audio_id": "a.wav", "question": "q", "answer": "x", "choices": ["x", "y"],\n'
                    '   "task": "speech"},\n  {"id": "x", "question": "q"}\n]\n')
    with pytest.raises(AnnotationError, match=r"mmau\.json:4 \(record 1 of the JSON list, 0-based\): missing field"):
        get_suite("mmau").load(str(path))
