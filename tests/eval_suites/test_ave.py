"""AVE: segment accuracy over ten one-second segments, MokA's parse against the strict one."""

from __future__ import annotations

import pytest

from eval_suites import AnnotationError, get_suite
from eval_suites.ave import official_ave_prediction


@pytest.fixture
def ave_file(tmp_path):
    path = tmp_path / "testSet.txt"
    path.write_text("Category&VideoID&Quality&StartTime&EndTime\n"
                    "Church bell&vid1&good&6&8\nDog&vid2&good&0&10\nDog&vid3&good&2&4\n")
    return str(path)


ANSWERS = {
    "vid1": "<event>Church bell</event><range>6,8</range>",
    "vid2": "<event>dog</event><range>0,4</range><range>5,9</range>",
    "vid3": "I don't know",
}


def test_official_parse():
    events = {"dog", "church bell", "none"}
    assert official_ave_prediction("<event>Dog (2 4)</event>", events) == ("dog", [(2, 4)])
    assert official_ave_prediction("<event>Dog</event><range>2-4</range><range>5,6</range>", events) == (
        "dog", [(5, 6)])
    assert official_ave_prediction("<event>Dog</event>", events) is None
    assert official_ave_prediction("<event>Cat</event><range>1,2</range>", events) is None


def test_official_mode_by_hand(ave_file):
    suite = get_suite("ave")
    samples = suite.load(ave_file)
    assert [s.id for s in samples] == ["vid1", "vid2", "vid3"]
    result = suite.score(samples, ANSWERS, "official")
    # vid1: 6-8 inclusive on both sides, 10/10; vid2: 0-4 and 5-9 cover 0-9, 10/10;
    # vid3 unparsed: its ten empty slots agree, 10/10
    assert result["metrics"]["segment_accuracy"] == 1.0 and result["metrics"]["parsed_videos"] == 2
    assert result["parse_failures"] == 1


def test_strict_mode_by_hand(ave_file):
    suite = get_suite("ave")
    result = suite.score(suite.load(ave_file), ANSWERS, "strict")
    # vid1: 10/10; vid2: [0,4) and [5,9) miss segments 4 and 9, 8/10; vid3: 0/10
    assert result["metrics"]["segment_accuracy"] == pytest.approx(18 / 30)
    assert result["parse_failures"] == 1 and result["metrics"]["num_segments"] == 30


def test_wrong_event_costs_only_its_segments(ave_file):
    suite = get_suite("ave")
    samples = [s for s in suite.load(ave_file) if s.id == "vid3"]
    # official: truth 2,3,4 = dog; guessed church bell there -> 3 wrong, 7 background right
    result = suite.score(samples, {"vid3": "<event>Church bell</event><range>2,4</range>"}, "official")
    assert result["metrics"]["segment_accuracy"] == pytest.approx(0.7)


def test_official_file(ave_file, tmp_path):
    suite = get_suite("ave")
    [path] = suite.write_official_files(suite.load(ave_file), ANSWERS, str(tmp_path))
    with open(path) as f:
        assert '"output": "event:Church bell start_time:6 end_time:8"' in f.readline()


def test_malformed_line_names_file_and_line(tmp_path):
    path = tmp_path / "testSet.txt"
    path.write_text("Dog&vid1&good&0&4\nDog&vid4&good&x&4\n")
    with pytest.raises(AnnotationError, match=r"testSet\.txt:2"):
        get_suite("ave").load(str(path))
