"""The command line: help texts and the end-to-end quick demo."""

from __future__ import annotations

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(*args, **kwargs):
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"}, **kwargs)


def test_top_level_help_lists_commands():
    out = _run("-m", "mllm.cli", "--help")
    assert out.returncode == 0
    for command in ("demo", "pretrain", "instruct"):
        assert command in out.stdout


def test_stage_scripts_explain_the_schema():
    for stage in ("pretrain", "instruct"):
        out = _run(f"stages/{stage}.py", "--help")
        assert out.returncode == 0, out.stderr
        assert "--config" in out.stdout and "section.field=value" in out.stdout
        assert "projector_lr" in out.stdout and "pretrained_projectors" in out.stdout
    # Every tuner type, with where its own fields go.
    tuners = out.stdout.split("tuners (", 1)[1].split("examples:", 1)[0]
    for name in ("none", "lora", "dora", "moka", "mora", "delo"):
        assert f"\n  {name} " in tuners
    assert "pair_encoder" in tuners and "continue_from" in tuners


def test_unknown_command_fails():
    out = _run("-m", "mllm.cli", "fly")
    assert out.returncode == 2 and "unknown command" in out.stderr


def test_quick_visual_demo_runs_end_to_end(tmp_path):
    """Stage 1, stage 2 and the evaluation table, through the console entry point."""
    out = _run("-m", "mllm.cli", "demo", "--visual-only", "--quick", "--output-dir", str(tmp_path), timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "majority-answer baseline" in out.stdout and "image tokens removed" in out.stdout
    results = json.load(open(tmp_path / "results.json"))
    assert set(results["results"]) == {"with image", "image tokens removed"}
    assert os.path.isfile(tmp_path / "runs" / "instruct" / "adapter" / "adapter_model.safetensors")
    assert os.path.isfile(tmp_path / "runs" / "pretrain" / "projectors.safetensors")


def test_quick_audio_visual_demo_runs_end_to_end(tmp_path):
    """The default demo: tiny BEATs in its official file format; sound or image removed."""
    out = _run("-m", "mllm.cli", "demo", "--quick", "--output-dir", str(tmp_path), timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    results = json.load(open(tmp_path / "results.json"))
    assert set(results["results"]) == {"with image and sound", "sound removed", "image removed"}
    assert {"beeps", "pitch", "loudness", "match", "color"} <= set(results["results"]["sound removed"]["per_type"])


def test_a_user_error_ends_in_one_line_and_debug_shows_the_traceback(tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text("model: {llm: x}\nnot_a_section: {}\n")
    out = _run("stages/instruct.py", "--config", str(config))
    assert out.returncode == 2
    # Exactly one line: the warnings nobody can act on (bitsandbytes' CPU kernel, the torchvision
    # fallback, ...) are quiet at every command (mllm.log_filters).
    lines = out.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"mllm instruct: error: {config}: unknown top-level section"), \
        out.stderr
    assert "not_a_section" in lines[0]
    debug = _run("stages/instruct.py", "--config", str(config), "--debug")
    assert debug.returncode != 0 and "Traceback" in debug.stderr and "ConfigError" in debug.stderr
