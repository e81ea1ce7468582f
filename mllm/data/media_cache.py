"""Preprocessed videos cached on disk beside the feature cache, keyed by the file's bytes, the
frame-sampling settings and the encoder's identity (config and weights): a video seen before is
neither decoded nor preprocessed again, and its tensor then hits the feature cache, so the
encoder is skipped too. A changed file, frame count or encoder misses; an unreadable entry is
made again. Entries are written atomically (ranks and DataLoader workers may share the folder).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from typing import Callable

import torch
from safetensors.torch import load_file, save_file

logger = logging.getLogger(__name__)

#: Bumped whenever the frame sampler changes which frames it picks.
VIDEO_SAMPLER_VERSION = "uniform-index-v1"


def file_digest(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


class DecodedVideoCache:
    def __init__(self, root: str, encoder_identity: Callable[[], str], settings: dict):
        self.root = root
        self.encoder_identity = encoder_identity
        self.settings = json.dumps({**settings, "sampler": VIDEO_SAMPLER_VERSION}, sort_keys=True)

    def key(self, path: str) -> str:
        return hashlib.sha256(f"{file_digest(path)}|{self.settings}|{self.encoder_identity()}".encode()).hexdigest()

    def entry(self, key: str) -> str:
        return os.path.join(self.root, key[:2], f"{key}.safetensors")

    def load_or_make(self, path: str, make: Callable[[], torch.Tensor]) -> torch.Tensor:
        if not os.path.isfile(path):
            return make()  # the loader names the missing file
        entry = self.entry(self.key(path))
        if os.path.isfile(entry):
            try:
                return load_file(entry)["video"]
            except Exception as e:  # truncated or corrupt entry: decode again
                logger.warning("decoded-video cache entry %s is unreadable (%s); decoding again", entry, e)
        tensor = make()
        os.makedirs(os.path.dirname(entry), exist_ok=True)
        tmp = f"{entry}.{os.getpid()}.tmp"
        save_file({"video": tensor.detach().to("cpu").contiguous()}, tmp)
        os.replace(tmp, entry)
        return tensor


def cached_video_loader(feature_cache, load: Callable[[str, str], torch.Tensor], settings: dict):
    """Wrap a video item loader ``(path, record_id) -> tensor`` with a :class:`DecodedVideoCache`
    under ``feature_cache``'s folder."""
    cache = DecodedVideoCache(os.path.join(feature_cache.root, "decoded_video"), feature_cache.encoder_digest, settings)
    return lambda path, rid: cache.load_or_make(path, lambda: load(path, rid))
