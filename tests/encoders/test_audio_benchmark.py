"""benchmarks/audio_encoders.py: the full-size settings are the released ones, and a --small run
works end to end."""

from __future__ import annotations

import importlib.util
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("audio_encoders",
                                                  os.path.join(ROOT, "benchmarks", "audio_encoders.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_full_size_dims_are_the_released_ones(bench):
    # BEATs iter3 / iter3+: 250 state-dict keys, 90.31 M parameters (no classifier head).
    import torch

    with torch.device("meta"):  # shapes only, no memory
        encoder, dims = bench.build_beats(small=False)
    assert dims == "12 x 768, 12 heads" and len(encoder.model.state_dict()) == 250
    assert round(sum(p.numel() for p in encoder.parameters()) / 1e6, 2) == 90.31
    assert bench.WHISPER_LARGE_V3 == dict(n_mels=128, n_ctx=1500, n_state=1280, n_head=20, n_layer=32)


def test_small_cpu_run(bench, capsys):
    results = bench.main(["--device", "cpu", "--batch", "1", "--repeats", "1"])
    assert [r["encoder"] for r in results] == ["BEATs", "Whisper"]
    assert results[0]["output"] == [1, 496, 192] and results[1]["output"] == [1, 1500, 384]
    assert all(r["encode_clips_per_s"] > 0 for r in results)
    assert "--small" in capsys.readouterr().out
