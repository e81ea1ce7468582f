"""Loading image and video files, with errors that name the file and the record.

A bad media file deep inside a dataset should fail with a message that says
which file and which record, not with a bare decoder traceback. Every
failure to read media is therefore a :class:`MediaError`.

Video is decoded (and written) with PyAV only: no ``ffmpeg`` binary is needed.
"""

from __future__ import annotations

import os
from typing import Sequence

import av
import numpy as np
from PIL import Image

#: Codec used by :func:`write_video`; the PyAV wheel bundles this encoder.
VIDEO_CODEC = "mpeg4"


class MediaError(ValueError):
    """A media file could not be read.

    ``str()`` reads ``"record 'ID': cannot read PATH: REASON"``; the record
    part is left out when ``record_id`` is None.
    """

    def __init__(self, path, reason: str, record_id=None):
        self.path = os.fspath(path)
        self.reason = reason
        self.record_id = record_id
        where = f"record '{record_id}': " if record_id is not None else ""
        super().__init__(f"{where}cannot read {self.path}: {reason}")

    def __reduce__(self):
        # Keeps the error picklable (e.g. across DataLoader worker processes).
        return (type(self), (self.path, self.reason, self.record_id))


def resolve_media_path(path, media_root=None) -> str:
    """Resolve a record's media path: relative paths are taken from ``media_root``."""
    path = os.fspath(path)
    if media_root is None or os.path.isabs(path):
        return path
    return os.path.join(os.fspath(media_root), path)


def load_image(path, record_id=None) -> Image.Image:
    """Open an image file fully decoded, as RGB."""
    _check_file(path, record_id)
    try:
        with Image.open(path) as image:
            # Decode every byte now: a truncated file must fail here, not later.
            image.load()
            return image.convert("RGB")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise MediaError(path, f"not a readable image ({exc})", record_id) from exc


def uniform_frame_indices(total: int, num_frames: int) -> list[int]:
    """``num_frames`` indices spread evenly over ``total`` frames, first and last included.

    With fewer frames than asked, some indices repeat, so the length is always
    ``num_frames``.
    """
    return [int(i) for i in np.round(np.linspace(0, total - 1, num_frames))]


def load_video_frames(path, num_frames: int, record_id=None) -> list[Image.Image]:
    """Decode a video and return ``num_frames`` RGB frames sampled uniformly over all of it.

    Frames are picked at :func:`uniform_frame_indices` of the decoded frame
    count; a short video gives repeated frames (the same image object).
    """
    if num_frames < 1:
        raise ValueError(f"num_frames must be at least 1, got {num_frames}")
    _check_file(path, record_id)
    try:
        return _sample_frames(os.fspath(path), num_frames)
    except _BadVideo as exc:
        raise MediaError(path, str(exc), record_id) from None
    except av.FFmpegError as exc:
        reason = getattr(exc, "strerror", None) or str(exc)
        raise MediaError(path, f"not a decodable video ({reason})", record_id) from exc


def write_video(path, frames: Sequence[Image.Image | np.ndarray], fps: int = 4) -> None:
    """Encode frames (PIL images or HxWx3 uint8 arrays, all one size) into a video file."""
    arrays = [_rgb_array(frame) for frame in frames]
    if not arrays:
        raise ValueError("write_video needs at least one frame")
    height, width = arrays[0].shape[:2]
    if any(a.shape != arrays[0].shape for a in arrays):
        raise ValueError("all video frames must have the same size")

    parent = os.path.dirname(os.fspath(path))
    if parent:
        os.makedirs(parent, exist_ok=True)
    with av.open(os.fspath(path), mode="w") as container:
        stream = container.add_stream(VIDEO_CODEC, rate=fps)
        stream.width, stream.height = width, height
        stream.pix_fmt = "yuv420p"
        for array in arrays:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(array, format="rgb24")))
        container.mux(stream.encode())  # flush frames the encoder still holds


# --- helpers ---------------------------------------------------------------


class _BadVideo(Exception):
    """A readable container that still holds no usable video."""


def _check_file(path, record_id) -> None:
    # Checked up front so the common mistakes get plain-words reasons.
    if not os.path.exists(path):
        raise MediaError(path, "file not found", record_id)
    if not os.path.isfile(path):
        raise MediaError(path, "not a regular file", record_id)
    if os.path.getsize(path) == 0:
        raise MediaError(path, "file is empty", record_id)


def _sample_frames(path: str, num_frames: int) -> list[Image.Image]:
    # Only the picked frames are kept, so long videos never sit in memory whole.
    # The container's frame count is a hint: when it is missing or wrong, the
    # decoded count decides and the frames are picked again.
    total = _declared_frame_count(path) or _decode_picked(path, set())[0]
    if total == 0:
        raise _BadVideo("video has no frames")
    indices = uniform_frame_indices(total, num_frames)
    count, picked = _decode_picked(path, set(indices))
    if count != total:
        if count == 0:
            raise _BadVideo("video has no frames")
        indices = uniform_frame_indices(count, num_frames)
        count, picked = _decode_picked(path, set(indices))
    return [picked[i] for i in indices]


def _declared_frame_count(path: str) -> int:
    with av.open(path) as container:
        return _video_stream(container).frames or 0


def _decode_picked(path: str, wanted: set[int]) -> tuple[int, dict[int, Image.Image]]:
    """Decode the whole video; return its frame count and the wanted frames as RGB images."""
    picked = {}
    count = 0
    with av.open(path) as container:
        stream = _video_stream(container)
        stream.thread_type = "AUTO"
        for count, frame in enumerate(container.decode(stream), start=1):
            if count - 1 in wanted:
                picked[count - 1] = frame.to_image()
    return count, picked


def _video_stream(container):
    if not container.streams.video:
        # A truncated .mp4 usually lands here too: its index sits at the end.
        raise _BadVideo("no video stream (not a video, or the file is truncated)")
    return container.streams.video[0]


def _rgb_array(frame) -> np.ndarray:
    image = frame if isinstance(frame, Image.Image) else Image.fromarray(np.asarray(frame))
    return np.asarray(image.convert("RGB"))
