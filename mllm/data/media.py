"""Loading image, video and audio files, with errors that name the file and the record.

A bad media file deep inside a dataset should fail with a message that says
which file and which record, not with a bare decoder traceback. Every
failure to read media is therefore a :class:`MediaError`.

Video (and the audio track of a video) is decoded with PyAV, audio files with
``soundfile``: no ``ffmpeg`` binary is needed.
"""

from __future__ import annotations

import bisect
import logging
import math
import os
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterable, Mapping, Sequence

import av
import numpy as np
import soundfile
import torch
from PIL import Image

from mllm.errors import UserError

logger = logging.getLogger(__name__)

#: Codecs used by :func:`write_video`; the PyAV wheel bundles these encoders.
VIDEO_CODEC = "mpeg4"
AUDIO_CODEC = "aac"

#: Sample rate every audio encoder takes (BEATs and Whisper): 16 kHz mono.
AUDIO_SAMPLE_RATE = 16000


class MediaError(UserError):
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


def write_video(path, frames: Sequence[Image.Image | np.ndarray], fps: int = 4,
                audio: np.ndarray | None = None, audio_rate: int = AUDIO_SAMPLE_RATE) -> None:
    """Encode frames (PIL images or HxWx3 uint8 arrays, all one size) into a video file,
    with an optional mono soundtrack (float waveform in [-1, 1] at ``audio_rate``)."""
    arrays = [_rgb_array(frame) for frame in frames]
    if not arrays:
        raise ValueError("write_video needs at least one frame")
    height, width = arrays[0].shape[:2]
    if any(a.shape != arrays[0].shape for a in arrays):
        raise ValueError("all video frames must have the same size")

    _make_parent(path)
    with av.open(os.fspath(path), mode="w") as container:
        stream = container.add_stream(VIDEO_CODEC, rate=fps)
        stream.width, stream.height = width, height
        stream.pix_fmt = "yuv420p"
        audio_stream = None
        if audio is not None:
            audio_stream = container.add_stream(AUDIO_CODEC, rate=audio_rate, layout="mono")
        for array in arrays:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(array, format="rgb24")))
        container.mux(stream.encode())  # flush frames the encoder still holds
        if audio_stream is not None:
            samples = np.asarray(audio, dtype=np.float32).reshape(1, -1)
            frame = av.AudioFrame.from_ndarray(samples, format="fltp", layout="mono")
            frame.sample_rate = audio_rate
            container.mux(audio_stream.encode(frame))  # PyAV cuts it into codec-sized frames
            container.mux(audio_stream.encode())


def write_audio(path, waveform: np.ndarray, sample_rate: int = AUDIO_SAMPLE_RATE) -> None:
    """Write a float waveform ((samples,) or (samples, channels)) as WAV / FLAC (by extension)."""
    _make_parent(path)
    soundfile.write(os.fspath(path), np.asarray(waveform, dtype=np.float32), sample_rate)


# --- audio -------------------------------------------------------------------

#: Record fields whose files ``load_audio`` reads.
AUDIO_FIELDS = ("audio", "speech")



def select_audio_paths(media: Mapping[str, Sequence[str]]) -> list[str]:
    """The files a record's sound comes from: its ``audio`` paths when it names any, else the
    audio tracks of its ``video`` paths (an explicit audio file wins over a video's track)."""
    return list(media.get("audio") or media.get("video") or [])


def split_audio_windows(waveform: np.ndarray, num_windows: int, window_samples: int | None,
                        hop_samples: int | None = None, offset_samples: int = 0) -> list[np.ndarray]:
    """``num_windows`` windows of ``window_samples``.

    Without ``hop_samples`` they are spread evenly over the clip (first at the start, last at
    the end). With it, window i starts at ``offset_samples + i * hop_samples`` — MokA's
    MUSIC-AVQA windows are [t - 0.5 s, t + 1.5 s] for t = 0, 6, ..., 54 s: offset -0.5 s, hop 6 s.
    Samples outside the clip are zeros. ``window_samples=None``: the whole clip is one window.
    """
    if window_samples is None:
        if num_windows != 1:
            raise ValueError("several audio windows need a window length (window_seconds)")
        return [waveform]
    if hop_samples is None:
        last_start = max(len(waveform) - window_samples, 0)
        starts = np.round(np.linspace(0, last_start, num_windows)).astype(int)
    else:
        starts = offset_samples + hop_samples * np.arange(num_windows)
    # Pad so every window lies inside the array, then shift the starts by the left padding.
    left = max(0, -int(starts.min()))
    right = max(0, int(starts.max()) + window_samples - len(waveform))
    padded = np.pad(waveform, (left, right))
    return [padded[s + left: s + left + window_samples] for s in starts]


@dataclass(frozen=True)
class AudioFileInfo:
    """What a file's header says about its sound (nothing decoded)."""

    channels: int
    sample_rate: int
    seconds: float | None     # None when the container does not say


def probe_audio(path) -> AudioFileInfo | None:
    """Channels, rate and length of an audio file, or of a video's audio track, from the header;
    None when the file cannot be opened or has no sound (``load_audio`` then says why)."""
    path = os.fspath(path)
    try:
        info = soundfile.info(path)
        return AudioFileInfo(info.channels, info.samplerate, info.frames / info.samplerate)
    except (soundfile.LibsndfileError, RuntimeError, OSError):
        pass
    try:
        with av.open(path) as container:
            if not container.streams.audio:
                return None
            stream = container.streams.audio[0]
            if stream.duration is not None and stream.time_base is not None:
                seconds = float(stream.duration * stream.time_base)
            else:
                seconds = container.duration / av.time_base if container.duration else None
            return AudioFileInfo(stream.channels, stream.rate, seconds)
    except (av.FFmpegError, OSError):
        return None


@dataclass
class AudioConversions:
    """Counts of the audio files a dataset names that ``load_audio`` converts as they load
    (channels averaged to mono, resampled to 16 kHz) and of the clips longer than the encoder
    takes (the rest is not encoded). Filled from file headers by :func:`count_audio_conversions`,
    once per dataset, so the count is exact whatever the DataLoader workers do."""

    files: int = 0
    multi_channel: int = 0
    other_rate: int = 0
    converted: int = 0
    trimmed: Counter = field(default_factory=Counter)              # media field -> clips
    longest: dict[str, float] = field(default_factory=dict)        # media field -> seconds
    max_seconds: dict[str, float] = field(default_factory=dict)    # media field -> limit

    def messages(self, sample_rate: int = AUDIO_SAMPLE_RATE) -> list[tuple[int, str]]:
        """(logging level, line) for each thing worth saying; empty when nothing happens."""
        lines = []
        if self.converted:
            lines.append((logging.INFO, (f"converting {self.converted} of {self.files} audio files to mono "
                                         f"{sample_rate / 1000:g} kHz as they load ({self.multi_channel} with "
                                         f"several channels, averaged; {self.other_rate} at other rates, "
                                         f"resampled)")))
        for media_field, count in sorted(self.trimmed.items()):
            limit = self.max_seconds[media_field]
            lines.append((logging.WARNING,
                          (f"{count} {media_field} clip(s) run past {limit:g} s (the longest "
                           f"{self.longest[media_field]:.1f} s): only the first {limit:g} s of each are encoded; "
                           f"raise model.encoders.{media_field}.max_seconds to encode more")))
        return lines


def count_audio_conversions(paths_by_field: Mapping[str, Iterable[str]],
                            max_seconds: Mapping[str, float | None] | None = None,
                            sample_rate: int = AUDIO_SAMPLE_RATE) -> AudioConversions:
    """Read the headers of the audio files (each once) that ``load_audio`` will read for each
    media field, and count what it converts and which clips exceed ``max_seconds[field]``."""
    counts = AudioConversions()
    seen: dict[str, AudioFileInfo | None] = {}
    for media_field, paths in paths_by_field.items():
        limit = (max_seconds or {}).get(media_field)
        for path in dict.fromkeys(paths):
            first_time = path not in seen
            if first_time:
                seen[path] = probe_audio(path)
            info = seen[path]
            if info is None:
                continue
            if first_time:
                counts.files += 1
                counts.multi_channel += info.channels > 1
                counts.other_rate += info.sample_rate != sample_rate
                counts.converted += info.channels > 1 or info.sample_rate != sample_rate
            if limit is not None and info.seconds is not None and info.seconds > limit:
                counts.trimmed[media_field] += 1
                counts.max_seconds[media_field] = limit
                counts.longest[media_field] = max(info.seconds, counts.longest.get(media_field, 0.0))
    return counts


def report_audio_conversions(where: str, media_per_record: Iterable[Mapping[str, Sequence[str]]],
                             max_seconds: Mapping[str, float | None] | None = None, media_root=None,
                             sample_rate: int = AUDIO_SAMPLE_RATE) -> AudioConversions:
    """Count the conversions and trims of the audio a dataset (``where``) names, log them once,
    and return the counts. ``media_per_record``: each record's field -> paths."""
    paths_by_field: dict[str, list[str]] = {}
    for media in media_per_record:
        for media_field in AUDIO_FIELDS:
            paths_by_field.setdefault(media_field, []).extend(
                resolve_media_path(p, media_root) for p in media.get(media_field, ()))
    counts = count_audio_conversions(paths_by_field, max_seconds, sample_rate)
    for level, line in counts.messages(sample_rate):
        logger.log(level, "%s: %s", where, line)
    return counts


def load_audio(path, sample_rate: int = AUDIO_SAMPLE_RATE, record_id=None) -> np.ndarray:
    """Decode an audio file, or the audio track of a video, to a mono float32 waveform at
    ``sample_rate`` (channels averaged, resampled when the file has another rate).

    WAV / FLAC / OGG go through ``soundfile``; anything it cannot open (MP4, MKV, M4A, ...)
    through PyAV, which reads a video's first audio stream.
    """
    _check_file(path, record_id)
    try:
        waveform, file_rate = _read_sound_file(os.fspath(path))
    except _BadAudio as exc:
        raise MediaError(path, str(exc), record_id) from None
    if waveform.size == 0:
        raise MediaError(path, "audio has no samples", record_id)
    if not np.isfinite(waveform).all():
        raise MediaError(path, "audio contains NaN or infinite samples", record_id)
    return resample_audio(waveform, file_rate, sample_rate)


def resample_audio(waveform: np.ndarray, orig_rate: int, target_rate: int,
                   zero_crossings: int = 16, rolloff: float = 0.945) -> np.ndarray:
    """Band-limited resampling of a 1-D waveform (windowed-sinc interpolation).

    Output sample n sits at input position t = n * orig_rate / target_rate; it is the sum of
    the input samples within ``zero_crossings`` lobes of t, weighted by a Hann-windowed sinc
    whose cutoff is ``rolloff`` times the lower Nyquist frequency (anti-aliasing when
    downsampling). Positions are computed with integers, so long clips do not drift.
    """
    if orig_rate <= 0 or target_rate <= 0:
        raise ValueError(f"sample rates must be positive, got {orig_rate} -> {target_rate}")
    signal = torch.as_tensor(np.asarray(waveform, dtype=np.float32))
    if signal.ndim != 1:
        raise ValueError(f"resample_audio expects a 1-D waveform, got shape {tuple(signal.shape)}")
    if orig_rate == target_rate or signal.numel() == 0:
        return signal.numpy()
    common = math.gcd(orig_rate, target_rate)
    up, down = target_rate // common, orig_rate // common
    num_out = math.ceil(signal.numel() * up / down)
    cutoff = 0.5 * rolloff * min(1.0, target_rate / orig_rate)        # cycles per input sample
    half_width = math.ceil(zero_crossings / (2 * cutoff))              # in input samples
    taps = torch.arange(-half_width + 1, half_width + 1)               # around floor(t)
    # t - floor(t) takes only `up` values (phases): one row of filter weights per phase.
    offset = taps[None, :].double() - (torch.arange(up).double() / up)[:, None]   # input index - t
    phase_weights = 2 * cutoff * torch.sinc(2 * cutoff * offset) * torch.cos(0.5 * math.pi * offset / half_width) ** 2
    phase_weights = phase_weights.masked_fill(offset.abs() >= half_width, 0.0).float()

    # Output n = m * up + j reads the inputs m * down + floor(j * down / up) + taps: for each j
    # that is a strided convolution, so all phases together are one conv1d with `up` kernels.
    shifts = torch.arange(up) * down // up
    kernel_size = int(shifts[-1]) + taps.numel()
    if up * kernel_size <= 2 ** 22:
        kernels = torch.zeros(up, kernel_size)
        for j in range(up):
            kernels[j, int(shifts[j]):int(shifts[j]) + taps.numel()] = phase_weights[j * down % up]
        num_blocks = math.ceil(num_out / up)
        right = (num_blocks - 1) * down + kernel_size - signal.numel() - half_width + 1
        padded = torch.nn.functional.pad(signal, (half_width - 1, max(right, 0)))
        out = torch.nn.functional.conv1d(padded[None, None], kernels[:, None], stride=down)[0, :, :num_blocks]
        return out.T.reshape(-1)[:num_out].contiguous().numpy()

    # Awkward ratios (e.g. 16001 -> 16000) would need huge kernels: gather each output's inputs.
    padded = torch.nn.functional.pad(signal, (half_width, half_width))
    out = torch.empty(num_out)
    chunk = max(1, 2 ** 21 // taps.numel())                            # bounds memory
    for start in range(0, num_out, chunk):
        n = torch.arange(start, min(start + chunk, num_out))
        base = n * down // up                                          # floor(t), exact
        window = padded[base[:, None] + taps[None, :] + half_width]
        out[start:start + n.numel()] = (window * phase_weights[n * down % up]).sum(-1)
    return out.numpy()


# --- helpers ---------------------------------------------------------------


class _BadVideo(Exception):
    """A readable container that still holds no usable video."""


class _BadAudio(Exception):
    """A file that yields no audio; the message is the reason shown to the user."""


def _make_parent(path) -> None:
    parent = os.path.dirname(os.fspath(path))
    if parent:
        os.makedirs(parent, exist_ok=True)


def _read_sound_file(path: str) -> tuple[np.ndarray, int]:
    """(mono float32 waveform, sample rate) via soundfile, else via PyAV."""
    try:
        samples, rate = soundfile.read(path, dtype="float32", always_2d=True)   # (frames, channels)
        return samples.mean(axis=1), rate
    except soundfile.LibsndfileError as exc:
        soundfile_reason = str(exc)
    try:
        return _decode_audio_track(path)
    except av.FFmpegError as exc:
        pyav_reason = getattr(exc, "strerror", None) or str(exc)
        raise _BadAudio(f"not a decodable audio file (soundfile: {soundfile_reason}; "
                        f"PyAV: {pyav_reason})") from None


def _decode_audio_track(path: str) -> tuple[np.ndarray, int]:
    """First audio stream of any container PyAV opens, channels averaged."""
    with av.open(path) as container:
        if not container.streams.audio:
            raise _BadAudio("no audio stream (a video without sound, or not a media file)")
        stream = container.streams.audio[0]
        # Float planar at the stream's own rate and layout; rate conversion is ours.
        converter = av.AudioResampler(format="fltp")
        chunks, rate = [], stream.rate
        for frame in container.decode(stream):
            rate = frame.sample_rate
            chunks += [out.to_ndarray() for out in converter.resample(frame)]
        chunks += [out.to_ndarray() for out in converter.resample(None)]
    if not chunks:
        return np.zeros(0, dtype=np.float32), rate or AUDIO_SAMPLE_RATE
    return np.concatenate(chunks, axis=1).mean(axis=0).astype(np.float32), rate


def _check_file(path, record_id) -> None:
    # Checked up front so the common mistakes get plain-words reasons.
    if not os.path.exists(path):
        raise MediaError(path, "file not found", record_id)
    if not os.path.isfile(path):
        raise MediaError(path, "not a regular file", record_id)
    if os.path.getsize(path) == 0:
        raise MediaError(path, "file is empty", record_id)


def _sample_frames(path: str, num_frames: int) -> list[Image.Image]:
    """The frames at :func:`uniform_frame_indices`, decoding only what reaching them takes.

    The packet index (read without decoding) gives every frame's timestamp in presentation
    order, so frame k is the k-th smallest pts, for constant and variable frame rates alike.
    Each wanted frame is then reached by seeking to the keyframe before it and decoding forward
    (consecutive targets after one keyframe share one pass). Streams without timestamps, and
    containers whose seek lands elsewhere (no index), fall back to decoding everything.
    """
    timestamps, keyframes = _frame_index(path)
    if timestamps is None:
        return _sample_frames_fully_decoded(path, num_frames)
    if not timestamps:
        raise _BadVideo("video has no frames")
    indices = uniform_frame_indices(len(timestamps), num_frames)
    picked = _decode_at(path, sorted({timestamps[i] for i in indices}), keyframes, timestamps)
    if picked is None:
        return _sample_frames_fully_decoded(path, num_frames)
    return [picked[timestamps[i]] for i in indices]


def _frame_index(path: str) -> tuple[list[int] | None, list[int]]:
    """(sorted pts of every video frame, sorted pts of the keyframes), from the packets alone;
    (None, []) when some packet has no timestamp."""
    with av.open(path) as container:
        stream = _video_stream(container)
        timestamps, keyframes = [], []
        for packet in container.demux(stream):
            if packet.size == 0:  # the demuxer's end-of-stream marker
                continue
            if packet.pts is None:
                return None, []
            timestamps.append(packet.pts)
            if packet.is_keyframe:
                keyframes.append(packet.pts)
    return sorted(timestamps), sorted(keyframes)


#: A seek (which flushes the decoder and its threads) pays off only when it skips at least this
#: many frames; nearer targets are reached by decoding on.
MIN_FRAMES_SKIPPED_PER_SEEK = 16


def _decode_at(path: str, wanted: list[int], keyframes: list[int],
               timestamps: list[int]) -> dict[int, Image.Image] | None:
    """Frames whose pts are ``wanted`` (sorted) as RGB images, or None when a seek lands past its
    target or the frames decode with other timestamps (then only a full decode is safe).
    ``timestamps``: every frame's pts, sorted."""
    if not keyframes or keyframes[0] > wanted[0]:
        return None
    picked: dict[int, Image.Image] = {}
    with av.open(path) as container:
        stream = _video_stream(container)
        stream.thread_type = "AUTO"
        frames, position = None, None
        for target in wanted:
            keyframe = keyframes[bisect.bisect_right(keyframes, target) - 1]
            # Seek when nothing is decoded yet, or when it skips enough frames to beat decoding on.
            skipped = 0 if position is None else (bisect.bisect_left(timestamps, keyframe)
                                                  - bisect.bisect_right(timestamps, position))
            if frames is None or position >= target or skipped >= MIN_FRAMES_SKIPPED_PER_SEEK:
                container.seek(keyframe, stream=stream, backward=True, any_frame=False)
                frames = container.decode(stream)
            for frame in frames:
                if frame.pts is None:
                    return None
                position = frame.pts
                if frame.pts >= target:
                    break
            if position != target:
                return None  # landed after the target, or the stream ended first
            picked[target] = frame.to_image()
    return picked


def _sample_frames_fully_decoded(path: str, num_frames: int) -> list[Image.Image]:
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
