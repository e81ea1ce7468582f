"""The runner on the tiny real model: generation, resumable log, results, missing encoders, CLI."""

from __future__ import annotations

import json
import os
import re
import shutil

import pytest

import mllm.inference
from eval_suites import AnnotationError
from eval_suites.runner import eval_main, read_answer_log, run_suite, score_answers
from mllm.errors import UserError


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


# --------------------------------------------------------------------------- checkpoint identity


def _saved_checkpoints(tiny_model, tmp_path):
    """Two checkpoint folders that differ only in one projector weight."""
    import torch

    first = str(tmp_path / "ckpt-a")
    tiny_model.save_pretrained(first)
    with torch.no_grad():
        next(tiny_model.projectors.parameters()).add_(0.5)
    second = str(tmp_path / "ckpt-b")
    tiny_model.save_pretrained(second)
    return first, second


def test_resume_with_another_checkpoint_is_refused(tiny_model, pope_file, demo_data, tmp_path, capsys):
    """A log of one checkpoint used to be 'resumed' by another (0 generated, the old score reported)."""
    first, second = _saved_checkpoints(tiny_model, tmp_path)
    out = str(tmp_path / "eval")
    common = ["--suite", "pope", "--data", pope_file, "--media-root", demo_data["media_root"], "--output-dir", out,
              "--limit", "2", "--max-new-tokens", "2", "--device", "cpu", "--no-progress"]
    assert eval_main(common + ["--checkpoint", first]) == 0
    with open(os.path.join(out, "samples.jsonl")) as f:
        header = json.loads(f.readline())
    assert header["log_header"] == 1
    assert header["checkpoint"]["path"] == os.path.abspath(first)
    assert "projectors.safetensors" in header["checkpoint"]["files"]
    with open(os.path.join(out, "results_official.json")) as f:
        results = json.load(f)
    assert results["checkpoint"] == header["checkpoint"]
    assert results["generation"]["prompt_format"]["template"] == "auto"
    rescored = score_answers("pope", pope_file, os.path.join(out, "samples.jsonl"), limit=2)
    assert rescored["checkpoint"] == header["checkpoint"] and rescored["answers"]["matched"] == 2
    capsys.readouterr()

    assert eval_main(common + ["--checkpoint", second]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "holds answers of" in err
    assert os.path.abspath(first) in err and os.path.abspath(second) in err and "--new-log" in err

    assert eval_main(common + ["--checkpoint", second, "--new-log"]) == 0
    with open(os.path.join(out, "results_official.json")) as f:
        results = json.load(f)
    assert results["checkpoint"]["path"] == os.path.abspath(second) and results["generation"]["generated_now"] == 2
    assert results["checkpoint"]["sha256"] != header["checkpoint"]["sha256"]
    assert len([n for n in os.listdir(out) if n.startswith("samples.replaced-")]) == 1  # the old log, set aside
    assert eval_main(common + ["--checkpoint", second]) == 0  # its own log resumes


def test_in_memory_model_identity_follows_its_weights(tiny_model, pope_file, demo_data, tmp_path):
    import torch

    kwargs = dict(media_root=demo_data["media_root"], max_new_tokens=2, progress=False, limit=2)
    out = str(tmp_path / "run")
    run_suite("pope", tiny_model, pope_file, out, **kwargs)
    with torch.no_grad():
        next(tiny_model.projectors.parameters()).add_(0.5)
    with pytest.raises(UserError, match=r"holds answers of a model built in memory \(sha256 [0-9a-f]{12}\), not "
                                        r"of a model built in memory"):
        run_suite("pope", tiny_model, pope_file, out, **kwargs)


# --------------------------------------------------------------------------- bad media


@pytest.fixture
def pope_with_bad_media(tmp_path, demo_data):
    """Four POPE questions over copied images: the second image is missing, the third corrupt."""
    with open(demo_data["eval"]) as f:
        images = [json.loads(line)["image"] for line in f][:4]
    media = tmp_path / "media"
    media.mkdir()
    for i, image in enumerate(images):
        if i == 1:
            continue
        target = media / f"{i}.png"
        if i == 2:
            target.write_bytes(b"not an image")
        else:
            shutil.copy(os.path.join(demo_data["media_root"], image), target)
    path = tmp_path / "coco_pope_random.json"
    path.write_text("".join(json.dumps({"question_id": i + 1, "image": f"{i}.png", "text": "Is there a circle?",
                                        "label": "yes"}) + "\n" for i in range(4)))
    return str(path), str(media)


def test_bad_media_names_the_annotation_line(tiny_model, pope_with_bad_media, tmp_path):
    labels, media = pope_with_bad_media
    kwargs = dict(media_root=media, max_new_tokens=2, progress=False)
    with pytest.raises(AnnotationError, match=rf"{re.escape(labels)}:2: sample 'random/2': media file not found: "
                                              rf".*1\.png.*--on-bad-media skip"):
        run_suite("pope", tiny_model, labels, str(tmp_path / "a"), **kwargs)
    with open(labels) as f:
        lines = f.readlines()
    with open(labels, "w") as f:  # only the corrupt image left: found when its batch is read
        f.writelines([lines[0], lines[2]])
    with pytest.raises(AnnotationError, match=rf"{re.escape(labels)}:2: sample 'random/3': cannot read "
                                              rf".*2\.png") as info:
        run_suite("pope", tiny_model, labels, str(tmp_path / "b"), **kwargs)
    assert "pending_prompts" not in str(info.value)


def test_bad_media_skipped_and_counted(tiny_model, pope_with_bad_media, tmp_path):
    labels, media = pope_with_bad_media
    results = run_suite("pope", tiny_model, labels, str(tmp_path / "run"), media_root=media, max_new_tokens=2,
                        progress=False, modes=("official", "strict"), on_bad_media="skip")
    for mode in ("official", "strict"):
        bad = results[mode]["bad_media"]
        assert bad["count"] == 2 and bad["policy"] == "skip"
        assert bad["samples"][0].startswith(f"{labels}:2: random/2: media file not found")
        assert bad["samples"][1].startswith(f"{labels}:3: random/3: cannot read")
        assert results[mode]["num_answered"] == 2
    assert results["official"]["num_scored"] == 2  # left out, as evaluate.py has no answer to zip
    strict = results["strict"]["metrics"]["splits"]["random"]
    assert results["strict"]["num_scored"] == 4 and strict["num_questions"] == 4 and strict["unanswered"] == 2
    assert results["official"]["metrics"]["splits"]["random"]["unanswered"] == 2
    assert read_answer_log(str(tmp_path / "run" / "samples.jsonl")).keys() == {"random/1", "random/4"}


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


# --------------------------------------------------------------------------- --option


def fake_judge(question, options, prediction):
    """Used by name (tests.eval_suites.test_runner:fake_judge) through --option judge=...; the
    import may give another module object than pytest's, so calls go to a file."""
    with open(os.environ["FAKE_JUDGE_LOG"], "a") as f:
        f.write(prediction + "\n")
    return "A"


def _mmau_file(tmp_path):
    records = [{"id": "sp", "audio_id": "sp.wav", "question": "q?", "answer": "yes", "choices": ["yes", "no"],
                "task": "speech"},
               {"id": "so", "audio_id": "so.wav", "question": "q?", "answer": "a dog", "choices": ["a dog", "a cat"],
                "task": "sound"}]
    path = tmp_path / "mmau.json"
    path.write_text(json.dumps(records))
    answers = tmp_path / "mmau_answers.jsonl"
    answers.write_text('{"id": "sp", "prediction": "yes"}\n{"id": "so", "prediction": "a cat"}\n')
    return str(path), str(answers)


def test_cli_option_reaches_the_suite(tmp_path):
    data, answers = _mmau_file(tmp_path)
    common = ["--suite", "mmau", "--data", data, "--answers", answers]
    assert eval_main(common + ["--output-dir", str(tmp_path / "speech")]) == 0
    assert eval_main(common + ["--output-dir", str(tmp_path / "all"), "--option", "subset=all"]) == 0
    with open(tmp_path / "speech" / "results_official.json") as f:
        speech = json.load(f)
    with open(tmp_path / "all" / "results_official.json") as f:
        every = json.load(f)
    assert speech["num_samples"] == 1 and speech["suite_options"] == {}
    assert every["num_samples"] == 2 and every["suite_options"] == {"subset": "all"}
    assert every["metrics"]["task"] == {"sound": 0.0, "speech": 1.0}


def test_cli_options_are_yaml_values(tmp_path, monkeypatch):
    path = tmp_path / "mmbench.tsv"
    path.write_text("index\tquestion\tA\tB\tanswer\tcategory\tl2-category\tsplit\n"
                    "1\tq\tcat\tdog\tA\tc\tl\tdev\n")
    answers = tmp_path / "answers.jsonl"
    answers.write_text('{"id": "1", "prediction": "no idea"}\n')
    monkeypatch.setenv("FAKE_JUDGE_LOG", str(tmp_path / "judge.log"))
    assert eval_main(["--suite", "mmbench", "--data", str(path), "--answers", str(answers), "--output-dir",
                      str(tmp_path / "out"), "--option", "circular=false",
                      "--option", "judge=tests.eval_suites.test_runner:fake_judge"]) == 0
    with open(tmp_path / "out" / "results_official.json") as f:
        result = json.load(f)
    assert result["num_samples"] == 1 and result["metrics"]["circular"] is False  # YAML false, not "false"
    assert (tmp_path / "judge.log").read_text() == "no idea\n"
    assert result["judge_calls"] == 1 and result["score"] == 1.0
    assert result["suite_options"] == {"circular": False, "judge": "tests.eval_suites.test_runner:fake_judge"}


def test_cli_unknown_or_malformed_option_is_a_clear_error(tmp_path, capsys):
    data, answers = _mmau_file(tmp_path)
    common = ["--suite", "mmau", "--data", data, "--answers", answers, "--output-dir", str(tmp_path / "o")]
    assert eval_main(common + ["--option", "subsett=all"]) == 2
    err = capsys.readouterr().err
    assert "suite 'mmau' has no option 'subsett'" in err and "valid options: subset (default 'speech')" in err
    assert eval_main(common + ["--option", "subset=everything"]) == 2
    assert "subset must be one of speech, sound, music, all; got 'everything'" in capsys.readouterr().err
    assert eval_main(common + ["--option", "subset"]) == 2
    assert "--option expects KEY=VALUE, got 'subset'" in capsys.readouterr().err
    assert eval_main(["--suite", "pope", "--data", data, "--answers", answers, "--option", "x=1"]) == 2
    assert "valid options: none, this suite takes no options" in capsys.readouterr().err
    avqa = ["--suite", "music_avqa", "--data", data, "--answers", answers]
    assert eval_main(avqa + ["--option", "video_path={video_id}.mp4"]) == 2  # YAML reads "{" as a mapping
    assert "quote text values" in capsys.readouterr().err
    assert eval_main(avqa + ["--option", "video_path=clips/video.mp4"]) == 2
    assert "video_path must be a path template with {video_id}" in capsys.readouterr().err


def test_cli_help_explains_option_and_partial_modality(capsys):
    with pytest.raises(SystemExit) as exit_info:
        eval_main(["--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "--option KEY=VALUE" in text and "read as YAML" in text and "repeatable" in text
    for piece in ("mmau: subset=speech", "mmbench: circular=True", "judge=None (a function", "protocol=default",
                  "audio_path=audios/{video_id}.wav", "vocabulary_path=None"):
        assert piece in text
    assert "--partial-modality MODALITY" in text and "section 4.3" in text


def test_python_api_options(tmp_path):
    data, answers = _mmau_file(tmp_path)
    assert score_answers("mmau", data, answers, options={"subset": "all"})["num_samples"] == 2
    with pytest.raises(ValueError, match=r"no option 'subst'.*valid options: subset"):
        score_answers("mmau", data, answers, options={"subst": "all"})


# --------------------------------------------------------------------------- --partial-modality

MOKA = {"type": "moka", "r": 4, "alpha": 8, "dropout": 0.0,
        "options": {"modalities": ["text", "visual"], "strengths": {"visual": 1.0}}}


@pytest.fixture
def moka_model(tiny_model):
    from mllm.config import TunerConfig

    tiny_model.apply_tuner(TunerConfig(**MOKA))
    return tiny_model


def _watch_router(monkeypatch):
    """Record the MokA router's partial modality at every generate_answers call."""
    seen = []
    real = mllm.inference.generate_answers

    def wrapped(model, dataset, **kwargs):
        seen.append(model.llm.base_model.router.partial_modality)
        return real(model, dataset, **kwargs)

    monkeypatch.setattr(mllm.inference, "generate_answers", wrapped)
    return seen


def test_partial_modality_is_applied_during_generation_and_recorded(moka_model, pope_file, demo_data, tmp_path,
                                                                    monkeypatch):
    seen = _watch_router(monkeypatch)
    kwargs = {"media_root": demo_data["media_root"], "batch_size": 2, "max_new_tokens": 2, "progress": False,
              "limit": 3}
    results = run_suite("pope", moka_model, pope_file, str(tmp_path / "visual"), partial_modality="VISUAL",
                        **kwargs)
    assert seen == ["visual", "visual"]                               # both batches, inside the context
    assert moka_model.llm.base_model.router.partial_modality is None  # and restored afterwards
    assert results["official"]["generation"]["partial_modality"] == "visual"
    with open(tmp_path / "visual" / "results_official.json") as f:
        assert json.load(f)["generation"]["partial_modality"] == "visual"

    seen.clear()
    results = run_suite("pope", moka_model, pope_file, str(tmp_path / "full"), **kwargs)
    assert seen == [None, None] and results["official"]["generation"]["partial_modality"] is None
    # a finished full-model log is not passed off as a partial-modality run
    with pytest.raises(ValueError, match=r"other settings \(partial_modality: None before, 'visual' now\)"):
        run_suite("pope", moka_model, pope_file, str(tmp_path / "full"), partial_modality="visual", **kwargs)


def test_partial_modality_through_the_cli_on_a_moka_checkpoint(moka_model, pope_file, demo_data, tmp_path,
                                                               monkeypatch):
    checkpoint = str(tmp_path / "checkpoint")
    moka_model.save_pretrained(checkpoint)
    seen = _watch_router(monkeypatch)
    out = tmp_path / "out"
    assert eval_main(["--suite", "pope", "--data", pope_file, "--checkpoint", checkpoint, "--media-root",
                      demo_data["media_root"], "--output-dir", str(out), "--limit", "2", "--max-new-tokens", "2",
                      "--device", "cpu", "--no-progress", "--partial-modality", "visual"]) == 0
    assert seen == ["visual"]
    with open(out / "results_official.json") as f:
        assert json.load(f)["generation"]["partial_modality"] == "visual"


def test_partial_modality_errors(tiny_model, pope_file, tmp_path, capsys):
    from mllm.config import TunerConfig

    with pytest.raises(ValueError, match=r"needs a checkpoint tuned with MokA; this model's tuner is 'none'"):
        run_suite("pope", tiny_model, pope_file, str(tmp_path / "a"), partial_modality="visual", progress=False)
    tiny_model.apply_tuner(TunerConfig(type="lora", r=2, alpha=4, dropout=0.0))
    with pytest.raises(ValueError, match=r"this model's tuner is 'lora'"):
        run_suite("pope", tiny_model, pope_file, str(tmp_path / "a"), partial_modality="visual", progress=False)
    answers = tmp_path / "answers.jsonl"
    answers.write_text('{"id": "random/1", "prediction": "yes"}\n')
    assert eval_main(["--suite", "pope", "--data", pope_file, "--answers", str(answers),
                      "--partial-modality", "visual", "--output-dir", str(tmp_path / "d")]) == 2
    assert "no effect with --answers" in capsys.readouterr().err


def test_partial_modality_must_be_routed_by_the_adapter(moka_model, pope_file, tmp_path):
    with pytest.raises(ValueError, match=r"no A matrix for it \(it routes text, visual\)"):
        run_suite("pope", moka_model, pope_file, str(tmp_path / "b"), partial_modality="audio", progress=False)
    with pytest.raises(ValueError, match=r"unknown modality 'image'"):
        run_suite("pope", moka_model, pope_file, str(tmp_path / "c"), partial_modality="image", progress=False)


def test_a_bad_prompt_names_the_annotation_line_not_the_prompts_file(tiny_model, demo_data, tmp_path):
    with open(demo_data["eval"]) as f:
        image = json.loads(f.readline())["image"]
    labels = tmp_path / "coco_pope_random.json"
    labels.write_text(json.dumps({"question_id": 1, "image": image, "text": "Is there a circle?", "label": "yes"})
                      + "\n" + json.dumps({"question_id": 2, "image": image, "text": "Is <image> there a circle?",
                                           "label": "no"}) + "\n")
    with pytest.raises(UserError) as info:
        run_suite("pope", tiny_model, str(labels), str(tmp_path / "o"), media_root=demo_data["media_root"],
                  max_new_tokens=2, progress=False)
    assert str(info.value).startswith(f"{labels}:2: sample 'random/2': ") and "pending_prompts" not in str(info.value)
