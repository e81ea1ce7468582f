"""MUSIC-AVQA: MokA's tag parse (skips) against the strict parse, per question type."""

from __future__ import annotations

import json

import pytest

from eval_suites import AnnotationError, get_suite
from eval_suites.music_avqa import VOCABULARY, official_avqa_answer, strict_avqa_answer


def _item(qid, modality, subtype, answer, question="How many instruments are sounding?", values="[]"):
    return {"video_id": f"{qid:08d}", "question_id": qid, "type": json.dumps([modality, subtype]),
            "question_content": question, "templ_values": values, "question_deleted": 0, "anser": answer}


@pytest.fixture
def avqa_file(tmp_path):
    items = [_item(1, "Audio", "Counting", "two"), _item(2, "Audio", "Comparative", "yes"),
             _item(3, "Visual", "Counting", "ten"), _item(4, "Visual", "Location", "left"),
             _item(5, "Audio-Visual", "Existential", "no"), _item(6, "Audio-Visual", "Temporal", "violin"),
             _item(7, "Audio-Visual", "Counting", "three",
                   question="Is the <Object> on the <LR> louder?", values='["violin", "left"]')]
    path = tmp_path / "avqa-test.json"
    path.write_text(json.dumps(items))
    return str(path)


ANSWERS = {
    "1": "<answer>two</answer>",
    "2": "<answer>Yes</answer>",
    "3": "<answer>more than ten</answer>",          # official: "ten" is a substring -> right
    "4": "left",                                     # official: no tag -> skipped
    "5": "<answer>no</answer> <answer>no</answer>",  # official: two tags -> skipped
    "6": "<answer>acoustic guitar</answer>",         # official: not in the vocabulary -> skipped
    "7": "<answer>3</answer>",                       # official: skipped; strict: three
}


def test_vocabulary_has_42_answers():
    assert len(VOCABULARY) == 42 and "more than ten" in VOCABULARY and "acoustic_guitar" in VOCABULARY


def test_parsers():
    assert official_avqa_answer("<answer> Piano </answer>") == "piano"
    assert official_avqa_answer("<answer>Acoustic_Guitar</answer>") == "acoustic_guitar"
    assert official_avqa_answer("piano") is None
    assert strict_avqa_answer("There are 2.") == "two"
    assert strict_avqa_answer("more than 10") == "more than ten"
    assert strict_avqa_answer("<answer>no</answer><answer>yes</answer>") is None
    assert strict_avqa_answer("") is None


def test_placeholders_are_filled(avqa_file):
    samples = get_suite("music_avqa").load(avqa_file)
    assert samples[6].question == "Is the violin on the left louder?"
    assert samples[0].media == {"video": ["videos/00000001.mp4"], "audio": ["audios/00000001.wav"]}


def test_official_mode_by_hand(avqa_file):
    suite = get_suite("music_avqa")
    result = suite.score(suite.load(avqa_file), ANSWERS, "official")
    metrics = result["metrics"]
    assert result["num_scored"] == 3 and result["parse_failures"] == 4 and metrics["accuracy"] == 1.0
    assert metrics["modalities"] == {"Audio": 1.0, "Visual": 1.0, "Audio-Visual": None}
    assert metrics["subtypes"]["Visual/Counting"] == 1.0 and metrics["subtypes"]["Visual/Location"] is None


def test_strict_mode_by_hand(avqa_file):
    suite = get_suite("music_avqa")
    result = suite.score(suite.load(avqa_file), ANSWERS, "strict")
    metrics = result["metrics"]
    assert result["num_scored"] == 7 and result["parse_failures"] == 0
    assert metrics["accuracy"] == pytest.approx(5 / 7)
    assert metrics["modalities"] == {"Audio": 1.0, "Visual": 0.5, "Audio-Visual": pytest.approx(2 / 3)}
    assert metrics["subtypes"]["Visual/Counting"] == 0.0


def test_official_file(avqa_file, tmp_path):
    suite = get_suite("music_avqa")
    [path] = suite.write_official_files(suite.load(avqa_file), ANSWERS, str(tmp_path))
    with open(path) as f:
        row = json.loads(f.readline())
    assert (row["output"], row["predict"], row["question_type"]) == ("two", ANSWERS["1"], ["Audio", "Counting"])


def test_bad_record_names_file_line_and_index(tmp_path):
    path = tmp_path / "avqa.json"
    # json.dump(indent=...) layout: "[", then each record over several lines; record 1 starts on line 11
    path.write_text(json.dumps([_item(1, "Audio", "Counting", "two"), _item(2, "Audio", "Counting", "lots")],
                               indent=1))
    with pytest.raises(AnnotationError,
                       match=r"avqa\.json:11 \(record 1 of the JSON list, 0-based\): answer 'lots'"):
        get_suite("music_avqa").load(str(path))
