"""Frozen encoders' outputs cached on disk, so each media item is encoded once across epochs,
runs and stages.

One safetensors file per item, named by a hash of the item's preprocessed tensor and of the
encoder's identity (its config and its weights): a changed image, encoder setting or checkpoint
gives a new name, so stale features are never read. An entry that cannot be read is encoded
again and rewritten. Entries are written atomically, so ranks sharing the folder are safe.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os

import torch
from safetensors.torch import load_file, save_file

from mllm.distributed import is_partitioned
from mllm.encoders.base import MediaEncoder

logger = logging.getLogger(__name__)


def _tensor_bytes(tensor: torch.Tensor) -> bytes:
    tensor = tensor.detach().to("cpu").contiguous()
    return f"{tensor.dtype}{tuple(tensor.shape)}".encode() + tensor.view(torch.uint8).numpy().tobytes()


class FeatureCache:
    def __init__(self, root: str, encoder: MediaEncoder, encoder_config):
        self.root = root
        self.encoder = encoder
        self.encoder_config = encoder_config
        self._encoder_digest: str | None = None

    def encoder_digest(self) -> str:
        """Hash of the encoder's config and weights (computed once)."""
        if self._encoder_digest is None:
            digest = hashlib.sha256(json.dumps(dataclasses.asdict(self.encoder_config), sort_keys=True).encode())
            for name, tensor in sorted(self.encoder.state_dict().items()):
                digest.update(name.encode())
                digest.update(_tensor_bytes(tensor))
            self._encoder_digest = digest.hexdigest()
        return self._encoder_digest

    def key(self, item: torch.Tensor) -> str:
        return hashlib.sha256(self.encoder_digest().encode() + _tensor_bytes(item)).hexdigest()

    def path(self, key: str) -> str:
        return os.path.join(self.root, key[:2], f"{key}.safetensors")

    def load(self, key: str) -> torch.Tensor | None:
        path = self.path(key)
        if not os.path.isfile(path):
            return None
        try:
            return load_file(path)["features"]
        except Exception as e:  # truncated or corrupt file: encode again
            logger.warning("feature cache entry %s is unreadable (%s); recomputing it", path, e)
            return None

    def store(self, key: str, features: torch.Tensor) -> None:
        path = self.path(key)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp"
        save_file({"features": features.detach().to("cpu").contiguous()}, tmp)
        os.replace(tmp, path)

    @torch.no_grad()
    def encode(self, inputs: torch.Tensor) -> torch.Tensor:
        """``encoder(inputs)``, reading cached rows and encoding (then storing) only the rest."""
        if any(is_partitioned(p) for p in self.encoder.parameters()):
            # ZeRO-3 partitions the encoder: every rank must run it on every step (its
            # parameter gathers are collectives), so the cache stands aside.
            return self.encoder(inputs)
        keys = [self.key(item) for item in inputs]
        rows = [self.load(k) for k in keys]
        missing = [i for i, row in enumerate(rows) if row is None]
        if missing:
            fresh = self.encoder(inputs[missing])
            for i, features in zip(missing, fresh):
                self.store(keys[i], features)
                rows[i] = features
        device = next(self.encoder.parameters()).device
        return torch.stack([row.to(device) for row in rows])


__all__ = ["FeatureCache"]
