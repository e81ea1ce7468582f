"""``mllm eval --answers``: each benchmark's own answer format, id matching and its counts, and
one-line errors for what a user gives."""

from __future__ import annotations

import json

import pytest

from eval_suites import get_suite
from eval_suites.runner import eval_main
from mllm.cli import main as mllm_main


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _score_cli(tmp_path, suite, answers, data=None, *extra):
    """Run ``mllm eval --answers`` and return its official results."""
    out = tmp_path / f"out-{suite}"
    argv = ["--suite", suite, "--answers", str(answers), "--output-dir", str(out), *extra]
    if data is not None:
        argv += ["--data", str(data)]
    assert eval_main(argv) == 0
    with open(out / "results_official.json") as f:
        return json.load(f)


# --------------------------------------------------------------------------- one test per suite


def _pope_labels(path, split, n=4):
    return _jsonl(path / f"coco_pope_{split}.json",
                  [{"question_id": i, "image": f"{i}.jpg", "text": f"Is there a cat {i}?",
                    "label": "yes" if i % 2 else "no"} for i in range(1, n + 1)])


def test_pope_evaluate_py_answer_file(tmp_path):
    """POPE's answer file: {question, answer} lines zipped with the label file by position."""
    labels = _pope_labels(tmp_path, "random")
    answers = _jsonl(tmp_path / "answers.jsonl", [{"question": f"Is there a cat {i}?", "answer": a}
                                                  for i, a in enumerate(["Yes", "No", "NO", "yes"], start=1)])
    result = _score_cli(tmp_path, "pope", answers, labels)
    # labels yes,no,yes,no; evaluate.py reads "NO" as yes (case-sensitive) -> 3 of 4 right
    assert result["metrics"]["splits"]["random"]["accuracy"] == 0.75
    assert result["answers"]["matched"] == 4 and result["answers"]["format"] == "POPE evaluate.py answer file"


def test_pope_answer_file_for_one_split_of_a_folder(tmp_path):
    folder = tmp_path / "pope"
    folder.mkdir()
    _pope_labels(folder, "random")
    _pope_labels(folder, "popular")
    rows = [{"question": "q", "answer": a} for a in ["Yes", "No", "Yes", "No", "Yes"]]  # one line too many
    answers = _jsonl(tmp_path / "coco_pope_popular_answers.jsonl", rows)
    result = _score_cli(tmp_path, "pope", answers, folder)
    assert list(result["metrics"]["splits"]) == ["popular"] and result["score"] == 1.0
    assert result["answers"]["unmatched"] == 1 and result["answers"]["unanswered"] == 4  # random has no answers
    assert "past the 4 questions" in result["answers"]["examples"]["unmatched"][0]


def test_mme_results_folder_alone(tmp_path):
    """calculation.py's results folder holds the ground truth: no --data, no images needed."""
    results = tmp_path / "Your_Results"
    results.mkdir()
    (results / "existence.txt").write_text(
        "1.jpg\tIs there a dog? Please answer yes or no.\tYes\tyes\n"
        "1.jpg\tIs there a cat? Please answer yes or no.\tNo\tNo, there is not\n"
        "2.jpg\tIs there a car? Please answer yes or no.\tYes\tYes\n"
        "2.jpg\tIs there a bus? Please answer yes or no.\tNo\tnot sure\n")
    (results / "OCR.txt").write_text("3.png\tIs it red? Please answer yes or no.\tYes\tmaybe\n"
                                     "3.png\tIs it blue? Please answer yes or no.\tNo\tno\n")
    result = _score_cli(tmp_path, "mme", results)
    subtasks = result["metrics"]["subtasks"]
    # "not sure" -> "no" (first four characters), so existence is 4/4 right, both images: 100 + 100
    assert subtasks["existence"]["score"] == 200.0
    assert subtasks["OCR"]["score"] == 50.0  # "maybe" is "other": acc 1/2, acc+ 0
    assert result["metrics"]["perception"] == 250.0 and result["data"] is None
    assert result["answers"]["matched"] == 6 and result["answers"]["unanswered"] == 0


def test_mmbench_prediction_table(tmp_path):
    data = tmp_path / "mmbench.tsv"
    data.write_text("index\tquestion\tA\tB\tanswer\tcategory\tl2-category\tsplit\n"
                    "1\tWhich?\tcat\tdog\tA\tc\tl\tdev\n2\tWhich?\tred\tblue\tB\tc\tl\tdev\n")
    table = tmp_path / "model_MMBench_DEV_EN.tsv"
    table.write_text("index\tquestion\tA\tB\tanswer\tprediction\n1\tWhich?\tcat\tdog\tA\tA\n"
                     "2\tWhich?\tred\tblue\tB\tThe answer is red\n")
    result = _score_cli(tmp_path, "mmbench", table, data, "--option", "circular=false")
    assert result["score"] == 0.5 and result["answers"]["matched"] == 2


def _seed_question(qid, answer, data_type="image"):
    return {"question_id": qid, "data_type": data_type, "data_id": f"{qid}.jpg", "question": "How many?",
            "answer": answer, "question_type_id": 1, "choice_a": "1", "choice_b": "2", "choice_c": "3",
            "choice_d": "4"}


def test_seed_llava_answer_file(tmp_path):
    data = tmp_path / "SEED-Bench.json"
    data.write_text(json.dumps({"question_type": {"Scene Understanding": 1},
                                "questions": [_seed_question("101", "A"), _seed_question("102", "B"),
                                              _seed_question("v7", "C", "video")]}))
    answers = _jsonl(tmp_path / "merge.jsonl", [{"question_id": 101, "text": "A"}, {"question_id": 102, "text": "B."},
                                                {"question_id": "v7", "text": "C"}])
    result = _score_cli(tmp_path, "seed_bench", answers, data)
    assert result["score"] == 0.5  # "B." is not "B" for the converter
    assert result["answers"]["matched"] == 2 and result["answers"]["unmatched"] == 0
    assert "1 answers to questions not scored here" in result["answers"]["notes"][0]


def test_mmau_evaluation_py_input(tmp_path):
    choices = ["a dog barking", "a cat meowing"]
    records = [{"id": f"r{i}", "audio_id": f"{i}.wav", "question": "What?", "answer": choices[0],
                "choices": choices, "task": "speech"} for i in range(1, 4)]
    data = tmp_path / "mmau-test-mini.json"
    data.write_text(json.dumps(records))
    answers = tmp_path / "predictions.json"
    answers.write_text(json.dumps([dict(records[0], model_output="a dog barking"),
                                   dict(records[1], model_output="A"), records[2]]))
    result = _score_cli(tmp_path, "mmau", answers, data)
    # the bare letter is wrong and r3 (no model_output) is skipped, as evaluation.py does
    assert result["score"] == 0.5 and result["num_scored"] == 2
    assert result["answers"]["unanswered"] == 1 and "1 records have no model_output" in result["answers"]["notes"][0]


def test_mmau_model_prediction_key_is_named(tmp_path, capsys):
    data = tmp_path / "mmau.json"
    record = {"id": "r1", "audio_id": "1.wav", "question": "q", "answer": "x", "choices": ["x", "y"],
              "task": "speech"}
    data.write_text(json.dumps([record]))
    answers = tmp_path / "lmms_eval_submission.json"
    answers.write_text(json.dumps([dict(record, model_prediction="x")]))
    assert eval_main(["--suite", "mmau", "--data", str(data), "--answers", str(answers),
                      "--output-dir", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "lmms_eval_submission.json: its records hold 'model_prediction'" in err and "'model_output'" in err


def test_air_bench_result_lines(tmp_path):
    meta = [{"uniq_id": i, "path": f"{i}.wav", "question": "Gender?", "choice_a": "male", "choice_b": "female",
             "answer_gt": "female", "task_name": "Speaker_Gender_Recognition", "dataset_name": "cv"}
            for i in range(1, 4)]
    data = tmp_path / "Foundation_meta.json"
    data.write_text(json.dumps(meta))
    answers = _jsonl(tmp_path / "Foundation_result_modelx.jsonl",
                     [dict(meta[0], response="B"), dict(meta[1], response="A"), dict(meta[2], response="dog")])
    result = _score_cli(tmp_path, "air_bench", answers, data)
    assert result["metrics"]["accuracy"] == 0.5 and result["metrics"]["fail_num"] == 1  # "dog" left out
    assert result["answers"]["matched"] == 3


def test_music_avqa_moka_log(tmp_path):
    items = [{"video_id": "00000001", "question_id": q, "type": '["Audio", "Counting"]',
              "question_content": "How many?", "templ_values": "[]", "anser": "two"} for q in (11, 12)]
    data = tmp_path / "avqa-test.json"
    data.write_text(json.dumps(items))
    answers = _jsonl(tmp_path / "inference_avqa.jsonl",
                     [{"question_id": 11, "output": "two", "predict": "<answer>two</answer>"},
                      {"question_id": 12, "output": "two", "predict": "<answer>three</answer>"}])
    result = _score_cli(tmp_path, "music_avqa", answers, data)
    assert result["score"] == 0.5 and result["answers"]["matched"] == 2


def test_ave_moka_log_matched_by_video_path(tmp_path):
    data = tmp_path / "testSet.txt"
    data.write_text("Church bell&vidA&good&0&10\nDog&vidB&good&0&10\n")
    answers = _jsonl(tmp_path / "inference_ave.jsonl", [
        {"output": "event:Church bell start_time:0 end_time:10", "video_path": "/data/AVE/vidA.mp4",
         "predict": "<s> ... <event> Church bell </event>, <range> 0,10 </range>.</s><unk>"},
        {"output": "event:Dog start_time:0 end_time:10", "video_path": "/data/AVE/vidB.mp4",
         "predict": "<event>Dog</event><range>0,4</range>"}])
    result = _score_cli(tmp_path, "ave", answers, data)
    assert result["score"] == pytest.approx(15 / 20)  # vidA all 10 slots; vidB segments 0-4 of 10
    assert result["answers"]["matched"] == 2


# --------------------------------------------------------------------------- matching and its counts


def test_counts_of_unmatched_repeated_and_missing_answers(tmp_path):
    labels = _pope_labels(tmp_path, "random")
    answers = _jsonl(tmp_path / "answers.jsonl", [{"id": "random/1", "prediction": "yes"},
                                                  {"id": "random/2", "prediction": "no"},
                                                  {"id": "random/2", "prediction": "yes"},
                                                  {"id": "popular/9", "prediction": "no"}])
    report = _score_cli(tmp_path, "pope", answers, labels)["answers"]
    assert (report["matched"], report["unmatched"], report["duplicates"], report["unanswered"]) == (2, 1, 1, 2)
    assert report["examples"]["unmatched"] == [f"{answers}:4: popular/9"]
    assert report["examples"]["unanswered"] == ["random/3", "random/4"]


def test_answers_matching_no_sample_fail_naming_file_and_ids(tmp_path, capsys):
    """Ids of another scheme used to be ignored silently (POPE then reported None, MME 0.0)."""
    labels = _pope_labels(tmp_path, "random")
    answers = _jsonl(tmp_path / "answers.jsonl", [{"id": i, "prediction": "yes"} for i in (1, 2)])
    assert eval_main(["--suite", "pope", "--data", labels, "--answers", answers,
                      "--output-dir", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{answers}: none of its 2 answers matches one of the 4 samples" in err
    assert "expected ids such as 'random/1'" in err and f"{answers}:1 answers '1'" in err
    assert not (tmp_path / "o" / "results_official.json").exists()


def test_mme_answers_with_wrong_ids_report_nothing_as_a_result(tmp_path, capsys):
    folder = tmp_path / "MME"
    (folder / "count").mkdir(parents=True)
    (folder / "count" / "1.txt").write_text("How many? Please answer yes or no.\tYes\nIs it two?\tNo\n")
    from PIL import Image

    Image.new("RGB", (4, 4)).save(folder / "count" / "1.jpg")
    answers = _jsonl(tmp_path / "answers.jsonl", [{"id": "count/1/0", "prediction": "yes"}])
    assert eval_main(["--suite", "mme", "--data", str(folder), "--answers", answers,
                      "--output-dir", str(tmp_path / "o")]) == 2
    assert "expected ids such as 'count/1.jpg/0'" in capsys.readouterr().err
    # a results folder beside the benchmark folder: matched by subtask, image and question
    results = tmp_path / "Your_Results"
    results.mkdir()
    (results / "count.txt").write_text("1.jpg\tHow many? Please answer yes or no.\tYes\tYes\n")
    result = _score_cli(tmp_path, "mme", results, folder)
    assert result["answers"]["matched"] == 1 and result["answers"]["examples"]["unanswered"] == ["count/1.jpg/1"]


# --------------------------------------------------------------------------- one-line user errors


def _mllm_eval(capsys, *argv):
    status = mllm_main(["eval", *argv])
    err = capsys.readouterr().err
    return status, err


def test_user_errors_are_one_line(tmp_path, capsys):
    labels = _pope_labels(tmp_path, "random")
    status, err = _mllm_eval(capsys, "--suite", "popee", "--data", labels, "--answers", labels)
    assert status == 2 and err.count("\n") == 1 and "invalid choice: 'popee'" in err

    missing = _jsonl(tmp_path / "answers.jsonl", [{"id": "random/1", "prediction": "yes"}, {"id": "random/2"}])
    status, err = _mllm_eval(capsys, "--suite", "pope", "--data", labels, "--answers", missing,
                             "--output-dir", str(tmp_path / "o"))
    assert status == 2 and err.count("\n") == 1 and f"{missing}:2: missing field 'prediction'" in err

    status, err = _mllm_eval(capsys, "--suite", "pope", "--data", str(tmp_path / "nope.json"), "--answers", labels)
    assert status == 2 and err.count("\n") == 1 and "nope.json: annotation file not found" in err

    binary = tmp_path / "coco_pope_adversarial.json"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    status, err = _mllm_eval(capsys, "--suite", "pope", "--data", str(binary), "--answers", labels)
    assert status == 2 and err.count("\n") == 1 and "coco_pope_adversarial.json" in err and "Traceback" not in err

    answers = _jsonl(tmp_path / "good.jsonl", [{"id": "random/1", "prediction": "yes"}])
    status, err = _mllm_eval(capsys, "--suite", "pope", "--data", labels, "--answers", answers,
                             "--output-dir", labels)  # a file where the output folder goes
    assert status == 2 and err.count("\n") == 1 and f"{labels}: File exists" in err

    status, err = _mllm_eval(capsys, "--suite", "pope", "--data", labels, "--answers", str(tmp_path))
    assert status == 2 and err.count("\n") == 1 and "is a folder; pope answers are a file" in err

    bad_record = _jsonl(tmp_path / "Foundation_result_modelx.jsonl",
                        [{"uniq_id": 1, "response": "A"}, {"response": "B"}])
    meta = tmp_path / "meta.json"
    meta.write_text(json.dumps([{"uniq_id": 1, "path": "1.wav", "question": "q", "choice_a": "x", "choice_b": "y",
                                 "answer_gt": "x", "task_name": "Speaker_Gender_Recognition", "dataset_name": "d"}]))
    status, err = _mllm_eval(capsys, "--suite", "air_bench", "--data", str(meta), "--answers", bad_record,
                             "--output-dir", str(tmp_path / "o"))
    assert status == 2 and err.count("\n") == 1 and f"{bad_record}:2: missing field(s) 'uniq_id'" in err


def test_help_documents_log_format_and_id_schemes(capsys):
    with pytest.raises(SystemExit):
        eval_main(["--help"])
    text = capsys.readouterr().out
    assert '{"id": SAMPLE_ID, "prediction": "model output"}' in text and "--new-log" in text
    for name in ("pope", "mme", "mmbench", "seed_bench", "mmau", "air_bench", "music_avqa", "ave"):
        assert get_suite(name).id_scheme.split(",")[0] in " ".join(text.split())
    assert "--on-bad-media" in text
