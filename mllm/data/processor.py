"""The media processor: a record's media -> the encoders' inputs, and each placeholder's token count.

Like transformers' ``processing_*`` classes it bundles the tokenizer (with the project's
placeholder tokens) and one preprocessor per encoder (``mllm.encoders.build_preprocessor``:
CLIP's image processor, BEATs' fbank, Whisper's log-mel), and it builds from configs alone:
``MediaProcessor.from_config(model_config)`` or ``MediaProcessor.from_pretrained(checkpoint_dir)``
load neither the LLM nor any encoder or projector weights. Datasets (``media_specs``), chat, serve
and evaluation prepare media with it; ``MultimodalLM`` holds one (``model.processor``).

What each media field does lives in one small class per kind of item (:data:`FIELD_ITEMS`):
an image is one part, a video ``model.video_frames`` frames, an audio / speech clip the windows
or 30 s chunks its encoder config asks for. A placeholder occupies
``parts x projector tokens(encoder rows per part)`` sequence positions.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import numpy as np
import torch
from PIL import Image

from mllm.checkpoint import read_mllm_config, resolve_bundled_paths
from mllm.config import EncoderConfig, ModelConfig
from mllm.data.audio_windows import clip_relative_windows
from mllm.data.dataset import MediaSpec
from mllm.data.media import AUDIO_SAMPLE_RATE, load_audio, load_image, load_video_frames, split_audio_windows
from mllm.data.media_cache import cached_video_loader
from mllm.encoders import MediaPreprocessor, build_preprocessor
from mllm.modality import PLACEHOLDERS
from mllm.projectors import read_projector_configs

#: The blank item ``dummy_media`` starts from (white frames, one second of silence).
_BLANK_IMAGE_SIZE = (64, 64)


def add_placeholder_tokens(tokenizer) -> dict[str, int]:
    """Add every placeholder as one special token (idempotent); return placeholder -> id."""
    missing = [ph for ph in PLACEHOLDERS if ph not in tokenizer.get_vocab()]
    if missing:
        tokenizer.add_tokens(missing, special_tokens=True)
    return {ph: tokenizer.convert_tokens_to_ids(ph) for ph in PLACEHOLDERS}


def _samples(seconds: float | None) -> int | None:
    return None if seconds is None else round(seconds * AUDIO_SAMPLE_RATE)


class AudioCut(NamedTuple):
    """Parts one audio / speech clip is cut into (``split_audio_windows``' arguments, in samples)."""

    count: int
    samples: int | None                 # None: the whole clip is one part
    hop: int | None                     # None: parts spread evenly over the clip
    offset: int
    max_seconds: float | None = None    # audio past it is not encoded (chunked speech)


def audio_cut(cfg: EncoderConfig, chunk_seconds: float | None) -> AudioCut:
    """How one clip is cut into the parts its encoder takes as items.

    An encoder with a fixed input length (Whisper, 30 s) and no windows configured takes
    consecutive chunks of that length up to ``max_seconds`` (one chunk by default): every clip
    gives the same number of chunks, so the placeholder's token count is fixed, and audio past
    the last chunk is trimmed (the data pipeline counts and reports such clips)."""
    if chunk_seconds is not None and cfg.window_seconds is None and cfg.num_windows == 1:
        chunk = _samples(chunk_seconds)
        count = 1 if cfg.max_seconds is None else math.ceil(cfg.max_seconds / chunk_seconds)
        return AudioCut(count, chunk, chunk, 0, max_seconds=count * chunk_seconds)
    return AudioCut(cfg.num_windows, _samples(cfg.window_seconds), _samples(cfg.window_hop_seconds),
                    _samples(cfg.window_offset_seconds))


# --------------------------------------------------------------------------- one class per kind of item


class ImageItems:
    """One image per item: (3, H, W)."""

    cache_decoded = False        # the decoded-video cache (feature cache on) applies to videos only

    def __init__(self, preprocessor: MediaPreprocessor, encoder: EncoderConfig, model: ModelConfig):
        self.preprocessor = preprocessor
        self.parts, self.part_samples, self.max_seconds = 1, None, None

    def decode(self, path: str, record_id: str):
        return load_image(path, record_id)

    def preprocess(self, decoded) -> torch.Tensor:
        return self.preprocessor.preprocess([decoded])[0]

    def blank(self):
        return Image.new("RGB", _BLANK_IMAGE_SIZE, "white")


class VideoItems(ImageItems):
    """``video_frames`` frames sampled uniformly per item: (frames, 3, H, W)."""

    cache_decoded = True

    def __init__(self, preprocessor: MediaPreprocessor, encoder: EncoderConfig, model: ModelConfig):
        super().__init__(preprocessor, encoder, model)
        self.parts = model.video_frames

    def decode(self, path: str, record_id: str):
        return load_video_frames(path, self.parts, record_id)

    def preprocess(self, decoded) -> torch.Tensor:
        return self.preprocessor.preprocess(decoded)

    def blank(self):
        return [super().blank()] * self.parts


class AudioItems:
    """A 16 kHz clip cut into windows or 30 s chunks (``audio_cut``): (parts, ...)."""

    cache_decoded = False

    def __init__(self, preprocessor: MediaPreprocessor, encoder: EncoderConfig, model: ModelConfig):
        self.preprocessor = preprocessor
        self.encoder = encoder
        self.cut = audio_cut(encoder, preprocessor.chunk_seconds)
        self.parts, self.part_samples, self.max_seconds = self.cut.count, self.cut.samples, self.cut.max_seconds

    def decode(self, path: str, record_id: str):
        return load_audio(path, record_id=record_id)

    def preprocess(self, decoded) -> torch.Tensor:
        cfg, cut = self.encoder, self.cut
        if cfg.window_clip_seconds is not None:  # MokA's placement, relative to the clip's length
            windows = clip_relative_windows(decoded, cut.count, cfg.window_seconds, cfg.window_clip_seconds,
                                            AUDIO_SAMPLE_RATE, cfg.window_hop_seconds, cfg.window_offset_seconds)
        else:
            windows = split_audio_windows(decoded, cut.count, cut.samples, cut.hop, cut.offset)
        return self.preprocessor.preprocess(windows)

    def blank(self):
        return np.zeros(AUDIO_SAMPLE_RATE, dtype=np.float32)


#: Record field -> how its items are decoded, cut into parts and preprocessed.
FIELD_ITEMS = {"image": ImageItems, "video": VideoItems, "audio": AudioItems, "speech": AudioItems}


# --------------------------------------------------------------------------- the processor


class MediaProcessor:
    """Media of every placeholder whose modality has an encoder; see the module docstring.

    ``feature_caches`` (modality -> ``mllm.encoders.cache.FeatureCache``, the model's own dict)
    turns on the decoded-video cache beside each encoder's feature cache."""

    #: Fields a native backbone's own processor takes (``NativeMediaProcessor``); none here.
    native_fields: tuple[str, ...] = ()

    def __init__(self, config: ModelConfig, tokenizer, preprocessors: dict[str, MediaPreprocessor],
                 feature_caches: dict | None = None):
        self.config = config
        self.tokenizer = tokenizer
        self.placeholder_ids = add_placeholder_tokens(tokenizer)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
        self.preprocessors = preprocessors
        self.feature_caches = {} if feature_caches is None else feature_caches
        self.items = {placeholder: FIELD_ITEMS[field](preprocessors[name], config.encoders[name], config)
                      for placeholder, (modality, field) in PLACEHOLDERS.items()
                      if (name := modality.name.lower()) in preprocessors}
        self._dummy_media: dict[str, Any] = {}

    # ------------------------------------------------------------------ building
    @classmethod
    def from_config(cls, config: ModelConfig, tokenizer=None) -> "MediaProcessor":
        """From an experiment's ``model`` section: the tokenizer and the encoders' preprocessors
        (their configs only); a native vision-language ``llm`` gives a ``NativeMediaProcessor``."""
        from transformers import AutoTokenizer

        if cls is MediaProcessor:
            from mllm.data.native_processor import NativeMediaProcessor, native_family

            if native_family(config):
                return NativeMediaProcessor.from_config(config, tokenizer=tokenizer)
        if tokenizer is None:
            tokenizer = AutoTokenizer.from_pretrained(config.tokenizer or config.llm,
                                                      trust_remote_code=config.trust_remote_code)
        return cls(config, tokenizer, {name: build_preprocessor(enc) for name, enc in config.encoders.items()})

    @classmethod
    def from_pretrained(cls, checkpoint_dir: str, **overrides) -> "MediaProcessor":
        """From a saved checkpoint folder (``mllm_config.json``, ``projectors.json``, the tokenizer):
        what ``MultimodalLM.from_pretrained`` would prepare media with, without loading it."""
        from transformers import AutoTokenizer

        config = read_model_config(checkpoint_dir, **overrides)
        tokenizer = AutoTokenizer.from_pretrained(checkpoint_dir, trust_remote_code=config.trust_remote_code)
        return cls.from_config(config, tokenizer=tokenizer)

    # ------------------------------------------------------------------ what the pipeline asks
    @property
    def supported_placeholders(self) -> list[str]:
        """Placeholders whose modality has an encoder: only these may appear in inputs."""
        return list(self.items)

    @property
    def media_fields(self) -> set[str]:
        """Record fields this processor takes (``image``, ``audio``...)."""
        return {spec.field for spec in self.media_specs().values()}

    def _items(self, placeholder: str):
        if placeholder not in self.items:
            modality = PLACEHOLDERS[placeholder][0].name.lower()
            raise ValueError(f"the model has no {modality} encoder, so it cannot take {placeholder}")
        return self.items[placeholder]

    def num_parts(self, placeholder: str) -> int:
        """Parts one item is encoded as (video frames, audio windows / chunks; 1 for an image)."""
        return self._items(placeholder).parts

    def num_media_tokens(self, placeholder: str) -> int:
        """How many sequence positions one item of this placeholder occupies."""
        items = self._items(placeholder)
        projector = self.config.projectors[PLACEHOLDERS[placeholder][0].name.lower()]
        return items.parts * projector.num_output_tokens(items.preprocessor.output_length(items.part_samples))

    def preprocess(self, placeholder: str, decoded) -> torch.Tensor:
        """A decoded item (image, list of frames, waveform) -> its preprocessed tensor."""
        return self._items(placeholder).preprocess(decoded)

    def load(self, placeholder: str, path: str, record_id: str) -> torch.Tensor:
        """A media file -> its preprocessed tensor, as training reads it."""
        items = self._items(placeholder)
        return items.preprocess(items.decode(path, record_id))

    def item_loader(self, placeholder: str):
        """(path, record_id) -> the preprocessed tensor of one item; with the feature cache on, a
        video seen before is not even decoded (keyed on its bytes)."""
        load = lambda path, rid: self.load(placeholder, path, rid)  # noqa: E731
        cache = self.feature_caches.get(PLACEHOLDERS[placeholder][0].name.lower())
        if cache is not None and self._items(placeholder).cache_decoded:
            return cached_video_loader(cache, load, {"video_frames": self.config.video_frames})
        return load

    def media_specs(self) -> dict[str, MediaSpec]:
        """Placeholder -> ``MediaSpec`` for ``MultimodalDataset``, for every modality with an encoder."""
        return {placeholder: MediaSpec(placeholder=placeholder, field=PLACEHOLDERS[placeholder][1],
                                       token_id=self.placeholder_ids[placeholder],
                                       num_tokens=self.num_media_tokens(placeholder),
                                       load_item=self.item_loader(placeholder), max_seconds=items.max_seconds)
                for placeholder, items in self.items.items()}

    def dummy_media(self, placeholder: str) -> torch.Tensor:
        """One blank item (white image or frames, one second of silence) as a batch of one."""
        if placeholder not in self._dummy_media:
            items = self._items(placeholder)
            self._dummy_media[placeholder] = items.preprocess(items.blank())[None]
        return self._dummy_media[placeholder]


def read_model_config(checkpoint_dir: str, **overrides) -> ModelConfig:
    """The ``model`` section a checkpoint folder was saved with (its ``./`` paths resolved, its
    projectors' configs from ``projectors.json``), with ``overrides`` applied."""
    saved = read_mllm_config(checkpoint_dir)
    raw = dict(resolve_bundled_paths(saved["model"], checkpoint_dir), **overrides)
    encoders = {name: EncoderConfig(**enc) for name, enc in raw.pop("encoders").items()}
    raw.pop("projectors")
    return ModelConfig(**raw, encoders=encoders, projectors=read_projector_configs(checkpoint_dir))


__all__ = ["FIELD_ITEMS", "AudioCut", "MediaProcessor", "add_placeholder_tokens", "audio_cut", "read_model_config"]
