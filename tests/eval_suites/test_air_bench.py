"""AIR-Bench Foundation speech tasks: official letter parse and denominators, both modes."""

from __future__ import annotations

import json

import pytest

from eval_suites import AnnotationError, get_suite
from eval_suites.air_bench import official_air_letter

GENDER = {"task_name": "Speaker_Gender_Recognition", "dataset_name": "common_voice_13_en",
          "choice_a": "male", "choice_b": "female"}
EMOTION = {"task_name": "Speaker_Emotion_Recontion", "dataset_name": "iemocap", "choice_a": "happy",
           "choice_b": "sad", "choice_c": "angry", "choice_d": "neutral"}


def _item(uid, base, answer):
    return dict(base, uniq_id=uid, path=f"{uid}.wav", question="Which one?", answer_gt=answer)


@pytest.fixture
def meta_file(tmp_path):
    items = [_item(1, GENDER, "female"), _item(2, GENDER, "male"), _item(3, GENDER, "female"),
             _item(4, EMOTION, "sad"), _item(5, EMOTION, "angry"),
             _item(6, {"task_name": "Music_Genre_Recognition", "dataset_name": "gtzan", "choice_a": "rock",
                       "choice_b": "jazz"}, "rock")]
    path = tmp_path / "Foundation_meta.json"
    path.write_text(json.dumps(items))
    return str(path)


ANSWERS = {"1": "B", "2": "The answer is A.", "3": "female", "4": "Answer: B", "5": ""}


def test_official_letter_parse():
    # "(B)" through its second-to-last character; "Based on ..." by accident (its first character)
    for text in ("B", "B.", "(B)", "The answer is B.", "Based on the audio, dog"):
        assert official_air_letter(text) == "B", text
    assert official_air_letter("Answer: B") == "A"
    assert [official_air_letter(t) for t in ("dog", "b", "None", "", "x")] == [None] * 5


def test_prompt_is_the_official_instruction(meta_file):
    samples = get_suite("air_bench").load(meta_file)
    assert [s.id for s in samples] == ["1", "2", "3", "4", "5"]  # the music task is not a speech task
    assert samples[0].media == {"speech": ["Speaker_Gender_Recognition_common_voice_13_en/1.wav"]}
    assert samples[0].question.endswith("Which one?\nA. male\nB. female\nC. None\nD. None")
    assert samples[0].question.startswith("Choose the most suitable answer from options A, B, C, and D")


def test_official_mode_by_hand(meta_file):
    suite = get_suite("air_bench")
    result = suite.score(suite.load(meta_file), ANSWERS, "official")
    tasks = result["metrics"]["tasks"]
    gender = tasks["Speaker_Gender_Recognition_common_voice_13_en"]
    assert (gender["num"], gender["parsed"], gender["correct"], gender["accuracy"]) == (3, 2, 2, 1.0)
    emotion = tasks["Speaker_Emotion_Recontion_iemocap"]
    assert (emotion["num"], emotion["parsed"], emotion["correct"], emotion["accuracy"]) == (2, 1, 0, 0.0)
    assert result["metrics"]["fail_num"] == 2 and result["parse_failures"] == 2
    assert result["metrics"]["accuracy"] == pytest.approx(2 / 3) and result["metrics"]["total_sum"] == 3
    assert result["metrics"]["mean_task_accuracy"] == 0.5


def test_strict_mode_by_hand(meta_file):
    suite = get_suite("air_bench")
    result = suite.score(suite.load(meta_file), ANSWERS, "strict")
    tasks = result["metrics"]["tasks"]
    assert tasks["Speaker_Gender_Recognition_common_voice_13_en"]["accuracy"] == 1.0
    assert tasks["Speaker_Emotion_Recontion_iemocap"]["accuracy"] == 0.5
    assert result["metrics"]["accuracy"] == 0.8 and result["metrics"]["mean_task_accuracy"] == 0.75
    assert result["parse_failures"] == 1


def test_task_without_parseable_answers_has_no_accuracy(meta_file):
    suite = get_suite("air_bench")
    samples = [s for s in suite.load(meta_file) if s.id == "5"]
    result = suite.score(samples, {"5": "no idea"}, "official")
    assert result["metrics"]["tasks"]["Speaker_Emotion_Recontion_iemocap"]["accuracy"] is None
    assert result["metrics"]["mean_task_accuracy"] is None


def test_official_file(meta_file, tmp_path):
    suite = get_suite("air_bench")
    [path] = suite.write_official_files(suite.load(meta_file), ANSWERS, str(tmp_path))
    assert path.endswith("Foundation_result_modelx.jsonl")
    with open(path) as f:
        rows = [json.loads(line) for line in f]
    assert len(rows) == 5 and rows[1]["response"] == "The answer is A." and rows[1]["answer_gt"] == "male"


def test_answer_matching_no_choice_is_an_error(tmp_path):
    path = tmp_path / "meta.json"
    path.write_text("[" + json.dumps(_item(1, GENDER, "child")) + "]")
    with pytest.raises(AnnotationError, match=r"meta\.json:1 \(record 0 of the JSON list, 0-based\): answer_gt"):
        get_suite("air_bench").load(str(path))
