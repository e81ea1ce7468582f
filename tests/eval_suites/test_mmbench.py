"""MMBench: circular evaluation and rule-based choice extraction, worked by hand."""

from __future__ import annotations

import base64
import csv
import io

import pytest
from PIL import Image

from eval_suites import AnnotationError, get_suite
from eval_suites.mmbench import Mmbench, official_choice, official_option_letter

COLUMNS = ["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "l2-category", "split", "image"]


def _png() -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (4, 4), (255, 0, 0)).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def _tsv(path, rows):
    with open(path, "w", newline="") as f:
        writer = csv.writer(f, delimiter="\t")
        writer.writerow(COLUMNS)
        writer.writerows(rows)
    return str(path)


@pytest.fixture
def mmbench_tsv(tmp_path):
    return _tsv(tmp_path / "MMBench_DEV_EN.tsv", [
        [1, "Which animal is it?", "nan", "cat", "dog", "", "", "B", "c1", "L2a", "dev", _png()],
        [2, "Which colour?", "a hint", "red", "green", "blue", "", "A", "c2", "L2a", "dev", "1"],
    ])


# Circular copies built by rotation: 1000001 = (dog, cat) answer A; 1000002 = (green, blue, red) answer C;
# 2000002 = (blue, red, green) answer B.
ANSWERS = {
    "1": "B",
    "1000001": "The answer is A",
    "2": "A. red",
    "1000002": "c",                                      # official: no upper-case letter token -> miss
    "2000002": "B, because red is the colour",           # official: letter not among the last 4 tokens -> miss
}


def test_official_extraction_rules():
    options = {"A": "cat", "B": "dog"}
    assert official_option_letter("The answer is A", options) == "A"
    assert official_option_letter("A is the correct answer", options) is None   # first token, 5 tokens
    assert official_choice("A is the correct answer", options) is None
    assert official_option_letter("I pick (B).", options) == "B"
    assert official_option_letter("Z", options) == "Z"
    assert official_option_letter("Cannot determine the answer", options) == "Z"
    assert official_option_letter("A or B", options) is None
    assert official_choice("it is a dog", options) == "B"              # option text
    assert official_choice("a dog or a cat", options) is None          # two option texts
    assert official_choice("The correct answer is **B**, a long explanation follows here", options) == "B"


def test_circular_copies_are_built(mmbench_tsv):
    samples = get_suite("mmbench").load(mmbench_tsv)
    by_id = {s.id: s for s in samples}
    assert sorted(by_id) == ["1", "1000001", "1000002", "2", "2000002"]
    assert by_id["1000001"].meta["options"] == {"A": "dog", "B": "cat"} and by_id["1000001"].target == "A"
    assert by_id["2000002"].meta["options"] == {"A": "blue", "B": "red", "C": "green"}
    assert by_id["2000002"].target == "B"
    assert by_id["2"].question.startswith("Hint: a hint\nQuestion: Which colour?\nOptions:\nA. red\n")
    assert by_id["1"].question.startswith("Question: Which animal")
    # row 2 refers to row 1's image
    assert (by_id["2"].inline_media[by_id["2"].media["image"][0]]
            == by_id["1"].inline_media[by_id["1"].media["image"][0]])


def test_official_mode_by_hand(mmbench_tsv):
    suite = get_suite("mmbench")
    result = suite.score(suite.load(mmbench_tsv), ANSWERS, "official")
    metrics = result["metrics"]
    assert metrics["overall"] == 0.5 and metrics["vanilla_accuracy"] == 1.0 and metrics["num_questions"] == 2
    assert metrics["category"] == {"c1": 1.0, "c2": 0.0}
    assert metrics["l2-category"] == {"L2a": 0.5} and metrics["split"] == {"dev": 0.5}
    assert result["parse_failures"] == 2 and result["judge_calls"] == 0


def test_strict_mode_by_hand(mmbench_tsv):
    suite = get_suite("mmbench")
    result = suite.score(suite.load(mmbench_tsv), ANSWERS, "strict")
    assert result["metrics"]["overall"] == 1.0 and result["parse_failures"] == 0


def test_judge_hook_is_asked_only_for_unmatched(mmbench_tsv):
    asked = []

    def judge(question, options, prediction):
        asked.append(prediction)
        return {"green": "A", "blue": "A"}.get(options["A"])  # the right letter for both rotations

    suite = Mmbench(judge=judge)
    samples = suite.load(mmbench_tsv)
    answers = dict(ANSWERS, **{"2000002": "no idea"})
    result = suite.score(samples, answers, "official")
    assert sorted(asked) == ["c", "no idea"] and result["judge_calls"] == 2
    # 2000002's right answer is B, the judge said A: still a miss
    assert result["metrics"]["overall"] == 0.5


def test_rule_based_refusal_is_final_and_the_judge_is_not_asked(mmbench_tsv):
    """VLMEvalKit: a "Z" from the rules (refusal) is an answer -- wrong -- not a reason to ask the judge."""
    asked = []

    def judge(question, options, prediction):
        asked.append(prediction)
        return "A"

    suite = Mmbench(judge=judge)
    samples = suite.load(mmbench_tsv)
    by_id = {s.id: s for s in samples}
    for refusal in ("Z", "Cannot determine the answer", "I'm sorry, but without the image provided I can't say"):
        assert suite.choose(by_id["1"], refusal, "official") == ("Z", False)
        assert suite.choose(by_id["1"], refusal, "strict") == ("Z", False)
    assert asked == []
    assert suite.choose(by_id["1"], "no idea", "official") == ("A", True) and asked == ["no idea"]
    answers = dict(ANSWERS, **{"1": "Z"})  # main pass of question 1 refuses: its group misses
    result = suite.score(samples, answers, "official")
    assert "Z" not in asked and result["judge_calls"] == 2 and result["metrics"]["overall"] == 0.0


def test_judge_reply_outside_the_options_is_no_answer(mmbench_tsv):
    suite = Mmbench(judge=lambda question, options, prediction: "maybe B")
    sample = suite.load(mmbench_tsv)[0]
    assert suite.choose(sample, "no idea", "official") == (None, True)


def test_missing_pass_sinks_the_group(mmbench_tsv):
    suite = get_suite("mmbench")
    answers = {k: v for k, v in ANSWERS.items() if k != "1000001"}
    assert suite.score(suite.load(mmbench_tsv), answers, "strict")["metrics"]["overall"] == 0.5


def test_submission_file(mmbench_tsv, tmp_path):
    suite = get_suite("mmbench")
    [path] = suite.write_official_files(suite.load(mmbench_tsv), ANSWERS, str(tmp_path / "out"))
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    assert len(rows) == 5 and "image" not in rows[0]
    row = next(r for r in rows if r["index"] == "2000002")
    assert (row["A"], row["answer"], row["prediction"]) == ("blue", "B", ANSWERS["2000002"])


def test_malformed_line_names_file_and_line(tmp_path):
    path = _tsv(tmp_path / "bad.tsv", [[1, "q", "", "x", "y", "", "", "A", "c", "l", "dev", ""],
                                       ["one", "q", "", "x", "y", "", "", "A", "c", "l", "dev", ""]])
    with pytest.raises(AnnotationError, match=r"bad\.tsv:3: index"):
        get_suite("mmbench").load(path)
