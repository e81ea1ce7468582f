"""What every frozen media encoder provides to the model and the data pipeline."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from mllm.errors import UserError
from mllm.modality import Modality


class EncoderCheckpointError(UserError):
    """An encoder checkpoint file that cannot be used as it is; the message names the file."""


def as_mono_waveform(item) -> torch.Tensor:
    """A 1-D float32 waveform from a numpy array or tensor (audio encoders' items)."""
    waveform = torch.as_tensor(np.asarray(item) if not torch.is_tensor(item) else item, dtype=torch.float32)
    if waveform.ndim != 1:
        raise ValueError(f"expected a 1-D mono waveform, got shape {tuple(waveform.shape)}")
    return waveform


class MediaPreprocessor:
    """What the data pipeline needs of an encoder, without its weights: decoded media (PIL
    images, waveforms, ...) -> the encoder's input tensors, and how many feature rows the
    encoder returns per item. ``from_config`` reads only configs or checkpoint metadata, so the
    media processor (``mllm.data.processor``) builds without loading any model."""

    # Encoders with a fixed input length (Whisper: 30 s) set it here; a longer clip is encoded
    # in consecutive chunks of it, up to the config's ``max_seconds``. None: no fixed length.
    chunk_seconds: float | None = None

    @classmethod
    def from_config(cls, cfg: Any) -> "MediaPreprocessor":
        raise NotImplementedError

    def preprocess(self, items: list[Any]) -> torch.Tensor:
        raise NotImplementedError

    def output_length(self, num_samples: int | None = None) -> int:
        """Feature rows the encoder returns for one item (of ``num_samples`` samples, for
        encoders whose output length depends on the input)."""
        raise NotImplementedError


class MediaEncoder(nn.Module):
    """A frozen encoder for one modality.

    Subclasses set ``modality`` and ``preprocessor_class``, and implement:

    * ``from_config(cfg)``: build from an ``EncoderConfig`` (loads real weights from ``cfg.path``);
    * ``__init__`` sets ``self.preprocessor``, its ``preprocessor_class`` built from the module's
      own settings (the same object ``preprocessor_class.from_config`` builds without weights);
    * ``forward(inputs)``: ``(N, ...) -> (N, L, hidden_size)`` features, one row per item.

    ``preprocess`` and ``output_length`` are the preprocessor's.
    """

    modality: Modality
    hidden_size: int
    # ``select_layer`` indexes the hidden states with the embeddings as state 0 (-1: last layer).
    select_layer: int
    # For tuners that adapt the encoder together with the LLM (MoRA pairs layers of the two):
    # the path of the transformer layer list inside this module, and the paths of the attention's
    # query and output projections inside one layer.
    layers_path: str
    attention_projections: tuple[str, str] = ("self_attn.q_proj", "self_attn.out_proj")
    preprocessor_class: type[MediaPreprocessor]
    preprocessor: MediaPreprocessor

    @classmethod
    def from_config(cls, cfg: Any) -> "MediaEncoder":
        raise NotImplementedError

    @property
    def chunk_seconds(self) -> float | None:
        return self.preprocessor_class.chunk_seconds

    def preprocess(self, items: list[Any]) -> torch.Tensor:
        """Decoded items -> one tensor batch; runs in the data pipeline, never touches parameters."""
        return self.preprocessor.preprocess(items)

    def output_length(self, num_samples: int | None = None) -> int:
        """Feature rows ``forward`` returns for one item (see ``MediaPreprocessor.output_length``)."""
        return self.preprocessor.output_length(num_samples)

    def num_used_layers(self) -> int:
        """How many layers, from the first, compute the features ``forward`` returns (LLaVA's
        ``select_layer=-2`` leaves the last layer unused)."""
        total = len(self.get_submodule(self.layers_path))
        return self.select_layer if self.select_layer >= 0 else total + 1 + self.select_layer

    def freeze(self) -> "MediaEncoder":
        self.requires_grad_(False)
        self.eval()
        return self

    def train(self, mode: bool = True) -> "MediaEncoder":
        # Frozen encoders stay in eval mode (no dropout) even when the Trainer calls .train().
        return super().train(False)
