"""The runner on the tiny real model: generation, resumable log, results, missing encoders, CLI."""

from __future__ import annotations

import json
import os

import pytest

import mllm.inference
from eval_suites.runner import eval_main, read_answer_log, run_suite, score_answers


@pytest.fixture
def pope_file(tmp_path, demo_data):
    """Five POPE-format questions over the demo's generated eval images."""
    with open(demo_data["eval"]) as f:
        images = [json.loads(line)["image"] for line in f][:5]
    path = tmp_path / "coco_pope_random.json"
    with open(path, "w") as f:
        for i, image in enumerate(images, start=1):
            f.write(json.dumps({"question_id": i, "image": image, "text": "Is there a circle in the image?",
                                "label": "yes" if i % 2 else "no"}) + "\n")
    return str(path)


def _counting_generate(monkeypatch, fail_on_call=None):
    """Wrap generate_answers: count prompts, and optionally raise on the n-th call (an interruption)."""
    calls = {"n": 0, "prompts": 0}
    real = mllm.inference.generate_answers

    def wrapped(model, dataset, **kwargs):
        calls["n"] += 1
        if fail_on_call is not None and calls["n"] == fail_on_call:
            raise KeyboardInterrupt
        calls["prompts"] += len(dataset)
        return real(model, dataset, **kwargs)

    monkeypatch.setattr(mllm.inference, "generate_answers", wrapped)
    return calls


def test_run_interrupt_and_resume(tiny_model, pope_file, demo_data, tmp_path, monkeypatch):
    out = str(tmp_path / "run")
    kwargs = dict(media_root=demo_data["media_root"], batch_size=2, max_new_tokens=3, progress=False,
                  modes=("official", "strict"))
    _counting_generate(monkeypatch, fail_on_call=2)
    with pytest.raises(KeyboardInterrupt):
        run_suite("pope", tiny_model, pope_file, out, **kwargs)
    first = read_answer_log(os.path.join(out, "samples.jsonl"))
    assert sorted(first) == ["random/1", "random/2"]  # the first batch survived the interruption
    with open(os.path.join(out, "samples.jsonl"), "a") as f:
        f.write('{"id": "random/3", "predic')  # a line cut off mid-write

    calls = _counting_generate(monkeypatch)
    results = run_suite("pope", tiny_model, pope_file, out, **kwargs)
    assert calls["prompts"] == 3  # only the unfinished samples were generated
    log = read_answer_log(os.path.join(out, "samples.jsonl"))
    assert sorted(log) == [f"random/{i}" for i in range(1, 6)]
    assert {k: log[k] for k in first} == first
    for mode in ("official", "strict"):
        with open(os.path.join(out, f"results_{mode}.json")) as f:
            saved = json.load(f)
        assert saved["mode"] == mode and saved["num_samples"] == 5 and "parse_failures" in saved
        assert saved["metrics"]["splits"]["random"]["num_questions"] == 5
        assert saved["generation"]["max_new_tokens"] == 3 and saved["data_sha256"]
        assert results[mode]["score"] == saved["score"]
    assert os.path.exists(os.path.join(out, "official", "pope_random_answers.jsonl"))

    calls = _counting_generate(monkeypatch)
    run_suite("pope", tiny_model, pope_file, out, **kwargs)
    assert calls["prompts"] == 0  # nothing left to do


def test_model_without_the_needed_encoder_fails_clearly(tiny_model, tmp_path):
    path = tmp_path / "mmau.json"
    path.write_text(json.dumps([{"id": "r1", "audio_id": "a.wav", "question": "q", "answer": "x",
                                 "choices": ["x", "y"], "task": "speech"}]))
    with pytest.raises(ValueError, match=r"needs speech \(<speech>\) input, but the model has no encoder"):
        run_suite("mmau", tiny_model, str(path), str(tmp_path / "out"), progress=False)


def test_score_alone_and_cli(pope_file, tmp_path, capsys):
    answers = tmp_path / "answers.jsonl"
    answers.write_text("".join(json.dumps({"id": f"random/{i}", "prediction": p}) + "\n"
                               for i, p in enumerate(["Yes", "No", "NO", "no", "yes"], start=1)))
    result = score_answers("pope", pope_file, str(answers), mode="official")
    # labels yes,no,yes,no,yes; official reads "NO" as yes -> all five right
    assert result["metrics"]["splits"]["random"]["accuracy"] == 1.0
    out = tmp_path / "cli"
    assert eval_main(["--suite", "pope", "--data", pope_file, "--answers", str(answers), "--output-dir", str(out),
                      "--mode", "both"]) == 0
    with open(out / "results_strict.json") as f:
        assert json.load(f)["metrics"]["splits"]["random"]["accuracy"] == 0.8
    assert "pope [official]" in capsys.readouterr().out


def test_bad_answer_log_line_names_file_and_line(tmp_path):
    path = tmp_path / "answers.jsonl"
    path.write_text('{"id": "1", "prediction": "yes"}\nnot json\n{"id": "2", "prediction": "no"}\n')
    with pytest.raises(ValueError, match=r"answers\.jsonl:2"):
        read_answer_log(str(path))
