"""mllm.data.media audio: files and video soundtracks to 16 kHz mono, resampling, clear errors."""

from __future__ import annotations

import numpy as np
import pytest

from mllm.data.media import (
    MediaError,
    load_audio,
    probe_audio,
    report_audio_conversions,
    resample_audio,
    select_audio_paths,
    write_audio,
    write_video,
)


def tone(rate, seconds, freqs=(440.0, 3000.0)):
    t = np.arange(int(rate * seconds)) / rate
    return sum(0.3 * np.sin(2 * np.pi * f * t) for f in freqs).astype(np.float32)


def frames(n=4, size=32):
    return [np.full((size, size, 3), 60 * i, dtype=np.uint8) for i in range(n)]


def assert_media_error(excinfo, path, record_id=None):
    err = excinfo.value
    assert err.path == str(path) and str(path) in str(err)
    if record_id is not None:
        assert f"record '{record_id}'" in str(err)


# --- resampling ----------------------------------------------------------------


@pytest.mark.parametrize("orig_rate", [44100, 48000, 22050, 8000, 16001])
def test_resample_keeps_tones_in_the_passband(orig_rate):
    resampled = resample_audio(tone(orig_rate, 1.0), orig_rate, 16000)
    assert resampled.dtype == np.float32
    assert resampled.size == int(np.ceil(orig_rate * 1.0 * 16000 / orig_rate))
    expected = tone(16000, resampled.size / 16000)[: resampled.size]
    inner = slice(100, -100)  # the edges see zero padding
    assert np.abs(resampled[inner] - expected[inner]).max() < 2e-3


def test_resample_removes_what_cannot_be_represented():
    # 12 kHz is above the 8 kHz Nyquist limit of 16 kHz audio: it must not alias to 4 kHz.
    resampled = resample_audio(tone(48000, 1.0, freqs=(12000.0,)), 48000, 16000)
    assert np.sqrt(np.mean(resampled[100:-100] ** 2)) < 1e-3


def test_resample_identity_and_errors():
    x = tone(16000, 0.1)
    assert np.array_equal(resample_audio(x, 16000, 16000), x)
    assert resample_audio(np.zeros(0, np.float32), 44100, 16000).size == 0
    with pytest.raises(ValueError, match="positive"):
        resample_audio(x, 0, 16000)
    with pytest.raises(ValueError, match="1-D"):
        resample_audio(np.zeros((2, 10)), 8000, 16000)


# --- files ---------------------------------------------------------------------


def test_wav_with_another_rate_and_two_channels_becomes_16k_mono(tmp_path):
    path = tmp_path / "stereo44k.wav"
    left = tone(44100, 0.5)
    write_audio(path, np.stack([left, left], axis=1), 44100)
    waveform = load_audio(path)
    assert waveform.dtype == np.float32 and waveform.ndim == 1 and waveform.size == 8000
    expected = tone(16000, 0.5)
    assert np.abs(waveform[100:-100] - expected[100:-100]).max() < 2e-3

    # Channels are averaged.
    write_audio(path, np.stack([left, np.zeros_like(left)], axis=1), 44100)
    assert np.allclose(load_audio(path), waveform / 2, atol=1e-4)


def test_flac_at_16k_round_trips(tmp_path):
    path = tmp_path / "clip.flac"
    clip = tone(16000, 0.25)
    write_audio(path, clip)
    assert np.allclose(load_audio(path), clip, atol=1 / 2 ** 14)  # 16-bit FLAC


def test_too_short_clip_loads_and_encodes(tmp_path):
    # 50 ms at 8 kHz: resampled to 800 samples (BEATs pads it to one patch, see test_beats).
    path = tmp_path / "blip.wav"
    write_audio(path, tone(8000, 0.05), 8000)
    waveform = load_audio(path)
    assert waveform.size == 800


def test_audio_track_of_a_video(tmp_path):
    path = tmp_path / "with_sound.mp4"
    soundtrack = tone(16000, 1.0, freqs=(440.0,))
    write_video(path, frames(), fps=4, audio=soundtrack)
    waveform = load_audio(path)
    # AAC adds priming samples and is lossy: compare the strongest alignment, not samples.
    assert 16000 <= waveform.size <= 16000 + 2048
    correlation = np.correlate(waveform, soundtrack, mode="valid").max()
    assert correlation / np.sqrt((soundtrack ** 2).sum() * (waveform ** 2).sum()) > 0.9


# --- saying what was converted ---------------------------------------------------


def test_conversions_are_counted_per_file_from_the_headers_and_logged_once(tmp_path, caplog):
    import logging

    write_audio(tmp_path / "stereo44k.wav", np.stack([tone(44100, 0.5)] * 2, axis=1), 44100)
    write_audio(tmp_path / "stereo16k.wav", np.stack([tone(16000, 0.5)] * 2, axis=1), 16000)
    write_audio(tmp_path / "mono16k.flac", tone(16000, 0.5))
    write_audio(tmp_path / "mono8k.wav", tone(8000, 2.0), 8000)
    write_video(tmp_path / "clip.mp4", frames(), fps=4, audio=tone(44100, 1.0), audio_rate=44100)
    info = probe_audio(tmp_path / "clip.mp4")
    assert (info.channels, info.sample_rate) == (1, 44100) and 0.9 < info.seconds < 1.2
    assert probe_audio(tmp_path / "stereo44k.wav") == type(info)(2, 44100, 0.5)
    assert probe_audio(tmp_path / "missing.wav") is None

    records = [{"audio": ["stereo44k.wav", "mono16k.flac"]}, {"audio": ["stereo44k.wav"]},   # same file twice
               {"speech": ["stereo16k.wav", "mono8k.wav"]}, {"audio": ["clip.mp4"]}, {"audio": ["missing.wav"]},
               {"image": ["a.png"]}]
    with caplog.at_level(logging.INFO, logger="mllm.data.media"):
        counts = report_audio_conversions("train.jsonl", records, {"speech": 1.5}, media_root=tmp_path)
    assert (counts.files, counts.converted, counts.multi_channel, counts.other_rate) == (5, 4, 2, 3)
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [
        ("train.jsonl: converting 4 of 5 audio files to mono 16 kHz as they load (2 with several channels, "
         "averaged; 3 at other rates, resampled)"),
        ("train.jsonl: 1 speech clip(s) run past 1.5 s (the longest 2.0 s): only the first 1.5 s of each are "
         "encoded; raise model.encoders.speech.max_seconds to encode more")]

    caplog.clear()
    with caplog.at_level(logging.INFO, logger="mllm.data.media"):
        counts = report_audio_conversions("eval.jsonl", [{"audio": ["mono16k.flac"]}], media_root=tmp_path)
    assert counts.files == 1 and counts.converted == 0 and caplog.records == []   # nothing to say


def test_explicit_audio_wins_over_the_video_track():
    assert select_audio_paths({"video": ["v.mp4"], "audio": ["a.wav"]}) == ["a.wav"]
    assert select_audio_paths({"video": ["v.mp4"]}) == ["v.mp4"]
    assert select_audio_paths({"image": ["i.png"]}) == []


# --- errors ------------------------------------------------------------------


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(MediaError, match="not found") as excinfo:
        load_audio(tmp_path / "nope.wav", record_id="r1")
    assert_media_error(excinfo, tmp_path / "nope.wav", "r1")

    empty = tmp_path / "empty.wav"
    empty.write_bytes(b"")
    with pytest.raises(MediaError, match="file is empty") as excinfo:
        load_audio(empty, record_id="r2")
    assert_media_error(excinfo, empty, "r2")

    silent = tmp_path / "no_samples.wav"
    write_audio(silent, np.zeros(0, np.float32))
    with pytest.raises(MediaError, match="no samples") as excinfo:
        load_audio(silent)
    assert_media_error(excinfo, silent)


@pytest.mark.parametrize("content", [b"RIFF\x00\x00\x00\x00WAVEfmt garbage" * 8, b"not audio at all"])
def test_corrupt_audio(tmp_path, content):
    path = tmp_path / "corrupt.wav"
    path.write_bytes(content)
    with pytest.raises(MediaError, match="not a decodable audio file") as excinfo:
        load_audio(path, record_id=7)
    assert_media_error(excinfo, path, 7)


def test_truncated_flac(tmp_path):
    path = tmp_path / "cut.flac"
    write_audio(path, tone(16000, 1.0))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])
    try:
        waveform = load_audio(path)
    except MediaError as err:  # libsndfile may refuse the cut stream ...
        assert err.path == str(path)
    else:                      # ... or return what it could decode
        assert 0 < waveform.size < 16000


def test_video_without_sound(tmp_path):
    path = tmp_path / "silent.mp4"
    write_video(path, frames())
    with pytest.raises(MediaError, match="no audio stream") as excinfo:
        load_audio(path, record_id="vid")
    assert_media_error(excinfo, path, "vid")


def test_non_finite_samples(tmp_path):
    path = tmp_path / "nan.wav"
    import soundfile

    soundfile.write(path, np.array([0.0, np.nan, 0.5], dtype=np.float32), 16000, subtype="FLOAT")
    with pytest.raises(MediaError, match="NaN or infinite"):
        load_audio(path)
