"""With ``model.feature_cache`` on, a video seen before is not decoded again: its preprocessed
frames are keyed by the file's bytes, the sampling settings and the encoder."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import mllm.data.media as media
from mllm.config import config_from_dict
from mllm.data.media import MediaError, write_video
from mllm.model import MultimodalLM
from tests.conftest import model_section


def _model(tiny_assets, cache_dir, frames=2):
    section = model_section(tiny_assets, feature_cache=str(cache_dir), video_frames=frames)
    return MultimodalLM.from_config(config_from_dict({"model": section}).model)


def _video(path, seed):
    rng = np.random.default_rng(seed)
    write_video(str(path), [rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for _ in range(6)])
    return str(path)


@pytest.fixture
def decodes(monkeypatch):
    calls = []
    real = media._sample_frames
    monkeypatch.setattr(media, "_sample_frames", lambda path, n: calls.append(path) or real(path, n))
    return calls


def test_a_cached_video_skips_decoding_and_changes_miss(tiny_assets, tmp_path, decodes):
    model = _model(tiny_assets, tmp_path / "cache")
    load = model.media_specs()["<video>"].load_item
    path = _video(tmp_path / "a.mp4", 0)
    first = load(path, "r1")
    assert torch.equal(load(path, "r1"), first) and len(decodes) == 1
    # Another run over the same cache folder decodes nothing.
    again = _model(tiny_assets, tmp_path / "cache").media_specs()["<video>"].load_item
    assert torch.equal(again(path, "r1"), first) and len(decodes) == 1
    # New bytes at the same path, or another frame count, miss.
    _video(path, 1)
    changed = load(path, "r1")
    assert len(decodes) == 2 and not torch.equal(changed, first)
    three = _model(tiny_assets, tmp_path / "cache", frames=3).media_specs()["<video>"].load_item
    assert three(path, "r1").shape[0] == 3 and len(decodes) == 3


def test_bad_files_keep_their_named_errors_with_the_cache_on(tiny_assets, tmp_path):
    load = _model(tiny_assets, tmp_path / "cache").media_specs()["<video>"].load_item
    with pytest.raises(MediaError, match="record 'r9': cannot read .*missing.mp4: file not found"):
        load(str(tmp_path / "missing.mp4"), "r9")
    noise = tmp_path / "noise.mp4"
    noise.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    for _ in range(2):  # an error is never cached
        with pytest.raises(MediaError, match="record 'r8': cannot read .*noise.mp4"):
            load(str(noise), "r8")
