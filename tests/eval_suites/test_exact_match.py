"""The exact_match suite (the demo's score): LLaVA-format records, normalised exact match per
question type, unanswered samples wrong, errors naming the line."""

from __future__ import annotations

import json

import pytest

from eval_suites import SUITES, get_suite
from eval_suites.base import AnnotationError

RECORDS = [
    {"id": "a", "image": "1.png", "audio": "1.wav", "question_type": "color",
     "conversations": [{"from": "human", "value": "<image>\n<audio>\nWhat color?"}, {"from": "gpt", "value": "Red."}]},
    {"id": "b", "image": ["2.png"], "answer": "two", "question_type": "count",
     "conversations": [{"from": "human", "value": "<image>\nHow many?"}]},
    {"id": "c", "question_type": "count",
     "conversations": [{"from": "human", "value": "How many beeps?"}, {"from": "gpt", "value": "three"}]},
]


def test_exact_match_scores_normalised_answers_per_type(tmp_path):
    path = tmp_path / "eval.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    suite = get_suite("exact_match")
    samples = suite.load(str(path))
    assert [s.media for s in samples] == [{"image": ["1.png"], "audio": ["1.wav"]}, {"image": ["2.png"]}, {}]
    assert suite.prompt(samples[0]) == "<image>\n<audio>\nWhat color?"      # as the training record asks
    result = suite.score(samples, {"a": " red", "b": "Two!"})                  # c unanswered: wrong
    assert result["metrics"]["per_type"] == {"color": 1.0, "count": 0.5}
    assert result["score"] == pytest.approx(2 / 3) and result["num_answered"] == 2
    assert suite.score(samples, {}, mode="strict")["score"] == 0.0


def test_a_record_without_reference_names_its_line(tmp_path):
    path = tmp_path / "eval.jsonl"
    path.write_text(json.dumps(RECORDS[0]) + "\n" + json.dumps({"id": "x", "conversations": [
        {"from": "human", "value": "<image>\nq"}]}) + "\n")
    with pytest.raises(AnnotationError, match=r"eval\.jsonl:2: no reference"):
        get_suite("exact_match").load(str(path))


def test_suites_are_discovered_from_their_modules():
    assert {"exact_match", "pope", "mme", "mmbench", "seed_bench", "mmau", "air_bench", "music_avqa",
            "ave"} == set(SUITES)
