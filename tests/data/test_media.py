"""mllm.data.media: image/video loading with clear errors, and PyAV video writing."""

import os
import pickle

import numpy as np
import pytest
from PIL import Image

from mllm.data.media import (
    MediaError,
    load_image,
    load_video_frames,
    resolve_media_path,
    uniform_frame_indices,
    write_video,
)

# Ten solid colours far apart from each other, so lossy video keeps them apart.
PALETTE = np.array(
    [
        [255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 0], [255, 0, 255],
        [0, 255, 255], [255, 255, 255], [0, 0, 0], [128, 128, 128], [255, 128, 0],
    ],
    dtype=np.uint8,
)


def solid_frames(n, size=32):
    return [np.tile(PALETTE[i], (size, size, 1)) for i in range(n)]


def palette_index(image):
    mean = np.asarray(image, dtype=float).reshape(-1, 3).mean(0)
    return int(np.argmin(((PALETTE.astype(float) - mean) ** 2).sum(1)))


def noise_png(path, size=64):
    pixels = np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return pixels


# --- paths and errors --------------------------------------------------------


def test_resolve_media_path(tmp_path):
    assert resolve_media_path("images/a.png", str(tmp_path)) == os.path.join(str(tmp_path), "images/a.png")
    assert resolve_media_path("/abs/a.png", str(tmp_path)) == "/abs/a.png"
    assert resolve_media_path("images/a.png", None) == "images/a.png"


def test_media_error_message_and_attributes():
    err = MediaError("x/a.png", "file not found", record_id="r7")
    assert str(err) == "record 'r7': cannot read x/a.png: file not found"
    assert (err.path, err.record_id) == ("x/a.png", "r7")
    assert isinstance(err, ValueError)
    assert str(MediaError("a.png", "bad")) == "cannot read a.png: bad"
    assert str(pickle.loads(pickle.dumps(err))) == str(err)


# --- images ------------------------------------------------------------------


def test_load_image_reads_png_as_rgb(tmp_path):
    path = tmp_path / "a.png"
    pixels = noise_png(path)
    image = load_image(str(path))
    assert image.mode == "RGB" and image.size == (64, 64)
    assert np.array_equal(np.asarray(image), pixels)

    gray = tmp_path / "gray.png"
    Image.new("L", (5, 7), 200).save(gray)
    assert load_image(gray).mode == "RGB"


def assert_media_error(excinfo, path, record_id=None):
    err = excinfo.value
    assert str(path) in str(err) and err.path == str(path)
    if record_id is not None:
        assert f"record '{record_id}'" in str(err) and err.record_id == record_id


def test_missing_image(tmp_path):
    path = tmp_path / "missing.png"
    with pytest.raises(MediaError, match="not found") as excinfo:
        load_image(str(path), record_id="rec-1")
    assert_media_error(excinfo, path, "rec-1")


def test_empty_image(tmp_path):
    path = tmp_path / "empty.png"
    path.write_bytes(b"")
    with pytest.raises(MediaError, match="empty") as excinfo:
        load_image(str(path), record_id="rec-2")
    assert_media_error(excinfo, path, "rec-2")


def test_truncated_png(tmp_path):
    path = tmp_path / "cut.png"
    noise_png(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(MediaError) as excinfo:
        load_image(str(path), record_id=3)
    assert_media_error(excinfo, path, 3)


def test_text_file_named_png(tmp_path):
    path = tmp_path / "fake.png"
    path.write_text("this is not an image\n")
    with pytest.raises(MediaError) as excinfo:
        load_image(str(path))
    assert_media_error(excinfo, path)
    assert "record" not in str(excinfo.value)


# --- video -------------------------------------------------------------------


def test_uniform_frame_indices():
    assert uniform_frame_indices(10, 4) == [0, 3, 6, 9]
    assert uniform_frame_indices(3, 5) == [int(i) for i in np.round(np.linspace(0, 2, 5))]
    assert uniform_frame_indices(7, 1) == [0]


def test_video_round_trip_samples_uniformly(tmp_path):
    path = tmp_path / "clip.mp4"
    write_video(str(path), solid_frames(10), fps=4)
    frames = load_video_frames(str(path), 4)
    assert len(frames) == 4
    assert all(f.mode == "RGB" and f.size == (32, 32) for f in frames)
    expected = [int(i) for i in np.round(np.linspace(0, 9, 4))]
    assert [palette_index(f) for f in frames] == expected


def test_video_all_frames_and_pil_input(tmp_path):
    path = tmp_path / "pil.mp4"
    write_video(path, [Image.fromarray(a) for a in solid_frames(5, size=16)])
    assert [palette_index(f) for f in load_video_frames(path, 5)] == [0, 1, 2, 3, 4]


def test_short_video_repeats_frames(tmp_path):
    path = tmp_path / "short.mp4"
    write_video(str(path), solid_frames(3))
    frames = load_video_frames(str(path), 5)
    assert len(frames) == 5
    assert [palette_index(f) for f in frames] == [int(i) for i in np.round(np.linspace(0, 2, 5))]


@pytest.mark.parametrize("declared", [0, 4, 25])
def test_wrong_declared_frame_count_falls_back_to_decoded_count(tmp_path, monkeypatch, declared):
    # Container frame counts can be missing (0) or wrong; sampling must follow the decoded count.
    import mllm.data.media as media

    path = tmp_path / "clip.mp4"
    write_video(str(path), solid_frames(10))
    monkeypatch.setattr(media, "_declared_frame_count", lambda _: declared)
    monkeypatch.setattr(media, "_frame_index", lambda _: (None, []))  # the full-decode path
    assert [palette_index(f) for f in load_video_frames(str(path), 4)] == [0, 3, 6, 9]


def test_corrupt_video(tmp_path):
    path = tmp_path / "noise.mp4"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(MediaError) as excinfo:
        load_video_frames(str(path), 4, record_id="vid-1")
    assert_media_error(excinfo, path, "vid-1")


def test_truncated_video(tmp_path):
    path = tmp_path / "cut.mp4"
    write_video(str(path), solid_frames(10))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(MediaError) as excinfo:
        load_video_frames(str(path), 4)
    assert_media_error(excinfo, path)


def test_missing_and_empty_video(tmp_path):
    with pytest.raises(MediaError, match="not found"):
        load_video_frames(str(tmp_path / "none.mp4"), 4)
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    with pytest.raises(MediaError, match="empty"):
        load_video_frames(str(empty), 4)


def test_video_without_frames(tmp_path):
    import av

    # An AVI keeps its video stream even with no frames written.
    path = tmp_path / "zero.avi"
    container = av.open(str(path), mode="w")
    stream = container.add_stream("mpeg4", rate=4)
    stream.width = stream.height = 32
    stream.pix_fmt = "yuv420p"
    container.start_encoding()
    container.close()
    with pytest.raises(MediaError, match="no frames"):
        load_video_frames(str(path), 4)


def test_file_without_video_stream(tmp_path):
    import av

    path = tmp_path / "sound.wav"
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("pcm_s16le", rate=8000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 800), np.int16), format="s16", layout="mono")
        frame.sample_rate = 8000
        container.mux(stream.encode(frame))
        container.mux(stream.encode())
    with pytest.raises(MediaError, match="no video stream"):
        load_video_frames(str(path), 4)


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="num_frames"):
        load_video_frames(str(tmp_path / "x.mp4"), 0)
    with pytest.raises(ValueError):
        write_video(str(tmp_path / "x.mp4"), [])
    with pytest.raises(ValueError):
        write_video(str(tmp_path / "x.mp4"), [np.zeros((8, 8, 3), np.uint8), np.zeros((16, 16, 3), np.uint8)])
