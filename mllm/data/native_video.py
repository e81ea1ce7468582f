"""Frames of a native video picked as the released Qwen-VL model picks them: by frames per second.

Qwen2.5-VL and Qwen2-VL sample a video at a frame rate (Qwen's own pipeline, qwen-vl-utils, uses
2 fps), at least ``min_frames`` and at most ``max_frames`` frames, a multiple of the temporal patch;
Qwen2.5-VL's temporal positions then follow the real time between sampled frames
(``second_per_grid_ts = temporal_patch_size / sampled_fps``). The sampling here is the checkpoint's
own video processor's (``sample_frames`` with its ``fps`` / ``num_frames`` / ``min_frames`` /
``max_frames``), fed with the file's real frame count and rate read by PyAV, so the frames and the
``VideoMetadata`` handed to the processor are what the released processor would take from the file.

Callers pass the result as ``videos=[frames], video_metadata=[metadata], do_sample_frames=False``.
"""

from __future__ import annotations

import os

import av
import numpy as np

from mllm.data.media import MediaError

#: Frames per second when the checkpoint's video processor names neither a rate nor a frame count
#: (transformers' saved Qwen-VL processors leave both unset): Qwen's own default, qwen-vl-utils' FPS.
QWEN_DEFAULT_FPS = 2.0


def sampling_settings(video_processor) -> dict:
    """``{"fps": ...}`` or ``{"num_frames": ...}``: how the checkpoint's video processor samples."""
    num_frames, fps = getattr(video_processor, "num_frames", None), getattr(video_processor, "fps", None)
    if num_frames is not None:
        return {"num_frames": num_frames}
    return {"fps": fps if fps is not None else QWEN_DEFAULT_FPS}


def read_video_metadata(path: str, record_id=None):
    """transformers' ``VideoMetadata`` of a file from its container (frame count, rate, duration,
    size), as transformers' own PyAV reader fills it."""
    from transformers.video_utils import VideoMetadata

    if not os.path.isfile(path):
        raise MediaError(path, "no such file", record_id)
    try:
        with av.open(os.fspath(path)) as container:
            stream = container.streams.video[0]
            total, rate = stream.frames, stream.average_rate
            if not total:   # the container does not say: count them
                total = sum(1 for _ in container.decode(video=0))
            height, width = stream.height, stream.width
    except (av.FFmpegError, IndexError) as exc:
        raise MediaError(path, f"not a decodable video ({getattr(exc, 'strerror', None) or exc})", record_id) \
            from None
    if not total or not rate:
        raise MediaError(path, "the video declares no frame rate or has no frames", record_id)
    return VideoMetadata(total_num_frames=int(total), fps=float(rate), duration=float(total / rate),
                         width=width, height=height, video_backend="pyav")


def sample_native_video(video_processor, path: str, record_id=None) -> tuple[np.ndarray, object]:
    """``(frames (T, H, W, 3) uint8 RGB, VideoMetadata with frames_indices)`` for ``path``,
    sampled by the checkpoint's ``video_processor``."""
    metadata = read_video_metadata(path, record_id)
    temporal_patch = getattr(video_processor, "temporal_patch_size", 1) or 1
    if metadata.total_num_frames < temporal_patch:
        # Too short to sample (Qwen's sampler would ask for 0 frames): every frame; the processor
        # repeats the last one up to a temporal patch.
        indices = list(range(metadata.total_num_frames))
    else:
        indices = [int(i) for i in video_processor.sample_frames(metadata, **sampling_settings(video_processor))]
    wanted, frames = set(indices), {}
    try:
        with av.open(os.fspath(path)) as container:
            for i, frame in enumerate(container.decode(video=0)):
                if i > indices[-1]:
                    break
                if i in wanted:
                    frames[i] = frame.to_ndarray(format="rgb24")
    except av.FFmpegError as exc:
        raise MediaError(path, f"not a decodable video ({getattr(exc, 'strerror', None) or exc})", record_id) \
            from None
    if not frames:
        raise MediaError(path, "no frame could be decoded", record_id)
    # A container may declare more frames than it decodes: those indices take the last decoded frame.
    last = frames[max(frames)]
    metadata.frames_indices = indices
    return np.stack([frames.get(i, last) for i in indices]), metadata
