"""MokA's audio-window placement, relative to each clip's actual length.

MokA's dataset code takes ``samples_per_second = len(audio) // T`` with T = 60 (MUSIC-AVQA) or 10
(AVE) instead of the sample rate, so its window offsets, hops and lengths are fractions of the
clip, not seconds: a 30 s MUSIC-AVQA clip gives ten 1 s windows starting at 0.5 t - 0.25 s. With
``window_clip_seconds: T`` an audio encoder places its windows the same way; each window is then
zero-padded (or cut) to ``window_seconds`` real seconds so every clip gives the same shapes.
For clips exactly T seconds long this is the fixed-seconds placement.
"""

from __future__ import annotations

import numpy as np

from mllm.data.media import split_audio_windows


def clip_relative_windows(waveform: np.ndarray, num_windows: int, window_seconds: float | None, clip_seconds: float,
                          sample_rate: int, hop_seconds: float | None = None,
                          offset_seconds: float = 0.0) -> list[np.ndarray]:
    if window_seconds is None:
        raise ValueError("window_clip_seconds places windows of window_seconds; set window_seconds too")
    unit = max(1, int(len(waveform) // clip_seconds))     # MokA's "samples per second"
    windows = split_audio_windows(
        waveform, num_windows, max(1, int(round(window_seconds * unit))),
        None if hop_seconds is None else int(round(hop_seconds * unit)), int(round(offset_seconds * unit)))
    length = int(round(window_seconds * sample_rate))
    return [np.pad(w, (0, max(0, length - len(w))))[:length] for w in windows]
