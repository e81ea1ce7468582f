"""MokA's audio-window placement relative to each clip's length (``window_clip_seconds``)."""

from __future__ import annotations

import numpy as np
import torch

from mllm.config import config_from_dict
from mllm.data.audio_windows import clip_relative_windows
from mllm.data.media import split_audio_windows
from mllm.model import MultimodalLM
from tests.conftest import TINY_PROJECTOR, model_section
from tests.encoders.test_beats import random_model, save_official

RATE = 100  # samples per second in these arrays


def test_a_30s_music_avqa_clip_gets_ten_1s_windows_at_half_the_times():
    clip = np.arange(1, 30 * RATE + 1, dtype=np.float32)  # 30 s, values 1..3000
    windows = clip_relative_windows(clip, 10, window_seconds=2.0, clip_seconds=60, sample_rate=RATE,
                                    hop_seconds=6.0, offset_seconds=-0.5)
    assert all(len(w) == 2 * RATE for w in windows)      # padded to the nominal 2 s
    # MokA: window i covers [0.5 t - 0.25 s, 0.5 t + 0.75 s) for t = 6 i, the first zero-padded in front.
    assert windows[0][:25].sum() == 0 and windows[0][25] == 1 and windows[0][99] == 75
    assert windows[1][0] == 0.5 * 6 * RATE - 25 + 1 and windows[1][99] == 0.5 * 6 * RATE + 75
    assert all(w[RATE:].sum() == 0 for w in windows)     # the second second is padding
    assert windows[9][0] == 0.5 * 54 * RATE - 25 + 1


def test_a_60s_clip_matches_the_fixed_seconds_placement():
    clip = np.random.default_rng(0).standard_normal(60 * RATE).astype(np.float32)
    relative = clip_relative_windows(clip, 10, 2.0, 60, RATE, 6.0, -0.5)
    fixed = split_audio_windows(clip, 10, 2 * RATE, 6 * RATE, -RATE // 2)
    assert all(np.array_equal(a, b) for a, b in zip(relative, fixed))


def test_ave_windows_of_a_longer_clip_are_cut_to_one_second():
    clip = np.arange(1, 12 * RATE + 1, dtype=np.float32)  # 12 s clip, T = 10: units of 1.2 s
    windows = clip_relative_windows(clip, 10, 1.0, 10, RATE, 1.0, 0.0)
    assert [w[0] for w in windows] == [1 + 120 * i for i in range(10)] and all(len(w) == RATE for w in windows)


def test_the_model_places_windows_relative_to_the_clip(tiny_assets, tmp_path):
    save_official(tmp_path / "beats.pt", random_model())
    section = model_section(tiny_assets)
    section["encoders"]["audio"] = {"type": "beats", "path": str(tmp_path / "beats.pt"), "num_windows": 3,
                                    "window_seconds": 1.0, "window_hop_seconds": 1.0, "window_clip_seconds": 3}
    section["projectors"]["audio"] = dict(TINY_PROJECTOR)
    model = MultimodalLM.from_config(config_from_dict({"model": section}).model)
    clip = np.random.default_rng(1).standard_normal(16000 * 3 // 2).astype(np.float32)  # 1.5 s clip
    got = model.processor.preprocess("<audio>", clip)
    # Three 0.5 s windows back to back, each padded to 1 s.
    expected = model.encoder_for("<audio>").preprocess(
        [np.pad(clip[i * 8000:(i + 1) * 8000], (0, 8000)) for i in range(3)])
    assert torch.equal(got, expected)
