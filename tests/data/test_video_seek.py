"""Seek-decoding (mllm.data.media) gives exactly the frames a full decode gives, on generated
mp4s with constant and variable frame rates, and decodes fewer frames to get them."""

from __future__ import annotations

from fractions import Fraction

import av
import numpy as np
import pytest

import mllm.data.media as media
from mllm.data.media import MediaError, load_video_frames


def write_clip(path, num_frames, pts=None, gop=6, size=48):
    """An mp4 of distinct noisy frames; ``pts`` in milliseconds gives a variable frame rate."""
    rng = np.random.default_rng(num_frames)
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("mpeg4", rate=25)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        stream.codec_context.gop_size = gop
        if pts is not None:
            stream.codec_context.time_base = Fraction(1, 1000)
        for i in range(num_frames):
            array = np.tile(rng.integers(0, 256, (1, 1, 3), dtype=np.uint8), (size, size, 1))
            array[: size // 2] = rng.integers(0, 256, (size // 2, size, 3), dtype=np.uint8)
            frame = av.VideoFrame.from_ndarray(array, format="rgb24")
            if pts is not None:
                frame.pts, frame.time_base = int(pts[i]), Fraction(1, 1000)
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return str(path)


def full_decode(path, num_frames):
    return [np.asarray(f) for f in media._sample_frames_fully_decoded(str(path), num_frames)]


def count_decoded(monkeypatch):
    """Patch the decoder's frame iteration to count decoded frames."""
    counter = {"frames": 0}
    real_decode = av.container.InputContainer.decode

    def counting(self, *args, **kwargs):
        for frame in real_decode(self, *args, **kwargs):
            counter["frames"] += 1
            yield frame

    monkeypatch.setattr(av.container.InputContainer, "decode", counting)
    return counter


@pytest.mark.parametrize("num_frames", [1, 4, 7, 10, 13])
def test_seek_gives_the_full_decodes_frames_constant_rate(tmp_path, num_frames):
    path = write_clip(tmp_path / "cfr.mp4", 61)
    timestamps, keyframes = media._frame_index(path)
    assert len(timestamps) == 61 and len(keyframes) > 5  # several GOPs: seeking is exercised
    seek = [np.asarray(f) for f in load_video_frames(path, num_frames)]
    assert len(seek) == num_frames
    assert all(np.array_equal(a, b) for a, b in zip(seek, full_decode(path, num_frames)))


def test_seek_gives_the_full_decodes_frames_variable_rate(tmp_path):
    gaps = np.random.default_rng(0).choice([10, 40, 120, 400], size=49)
    pts = np.concatenate([[0], np.cumsum(gaps)])
    path = write_clip(tmp_path / "vfr.mp4", 50, pts=pts)
    timestamps, _ = media._frame_index(path)
    with av.open(path) as container:
        time_base = container.streams.video[0].time_base
    durations = {round(float((b - a) * time_base), 3) for a, b in zip(timestamps, timestamps[1:])}
    assert len(durations) >= 3, "the clip must really have a variable frame rate"
    for num_frames in (5, 8, 16):
        seek = [np.asarray(f) for f in load_video_frames(path, num_frames)]
        assert all(np.array_equal(a, b) for a, b in zip(seek, full_decode(path, num_frames)))


def test_seeking_decodes_far_fewer_frames(tmp_path, monkeypatch):
    path = write_clip(tmp_path / "long.mp4", 300, gop=12)
    counter = count_decoded(monkeypatch)
    load_video_frames(path, 8)
    seeking = counter["frames"]
    counter["frames"] = 0
    media._sample_frames_fully_decoded(path, 8)
    assert seeking <= 8 * 12 and counter["frames"] >= 300


def test_stream_without_timestamps_falls_back_to_a_full_decode(tmp_path, monkeypatch):
    path = write_clip(tmp_path / "clip.mp4", 30)
    monkeypatch.setattr(media, "_frame_index", lambda _: (None, []))
    frames = [np.asarray(f) for f in load_video_frames(path, 5)]
    monkeypatch.undo()
    assert all(np.array_equal(a, b) for a, b in zip(frames, [np.asarray(f) for f in load_video_frames(path, 5)]))


def test_a_seek_that_lands_elsewhere_falls_back(tmp_path, monkeypatch):
    # An index whose keyframe timestamps are wrong (as in containers without a real index):
    # the decoded timestamps disagree, so the frames come from a full decode instead.
    path = write_clip(tmp_path / "clip.mp4", 30)
    real = media._frame_index
    monkeypatch.setattr(media, "_frame_index", lambda p: (lambda ts, ks: ([t + 1 for t in ts], ks))(*real(p)))
    frames = [np.asarray(f) for f in load_video_frames(path, 5)]
    assert all(np.array_equal(a, b) for a, b in zip(frames, full_decode(path, 5)))


def test_truncated_and_corrupt_files_keep_their_named_errors(tmp_path):
    path = write_clip(tmp_path / "cut.mp4", 30)
    with open(path, "rb") as f:
        data = f.read()
    cut = tmp_path / "half.mp4"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(MediaError, match=r"half.mp4: .*(truncated|not a decodable video)") as excinfo:
        load_video_frames(str(cut), 4, record_id="r1")
    assert "record 'r1'" in str(excinfo.value)
    noise = tmp_path / "noise.mp4"
    noise.write_bytes(np.random.default_rng(1).integers(0, 256, 8192, dtype=np.uint8).tobytes())
    with pytest.raises(MediaError, match="noise.mp4"):
        load_video_frames(str(noise), 4)
