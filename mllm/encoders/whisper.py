"""Whisper audio encoder (speech), from the ``openai-whisper`` package.

``cfg.path`` is an official checkpoint file (``{'dims': dict, 'model_state_dict': ...}``) of
any size, tiny to large-v3 / turbo (128 mel bins); only the ``encoder.*`` weights are loaded.
Nothing is downloaded: a model *name* such as ``"large-v3"`` is not accepted, pass the file.

Speech longer than 30 s is encoded in consecutive 30 s chunks, up to the config's
``max_seconds`` (the media processor cuts the clip; see :func:`num_chunks`): each chunk is one item,
so a 70 s clip with ``max_seconds: 90`` is three items whose features are concatenated in order,
the last chunk padded with silence exactly as Whisper pads any short input.

Each item is padded or trimmed to 30 s and turned into Whisper's log-mel spectrogram on its
own: the package's batched call normalises with the maximum of the whole batch, which would
make one clip's features depend on the others. The encoder needs exactly 3000 mel frames and
gives 1500 positions (20 ms each).

Padding is not masked anywhere on the model's path: the official Whisper pads with silence
(zero audio) and attends over all 1500 positions, and SALMONN feeds every position to its
window-level Q-Former too (as MokA feeds BEATs its zero-padded windows whole).
``preprocess_with_padding_mask`` / ``forward_with_padding_mask`` report which positions are
padding, for callers who want them.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from mllm.encoders import register_encoder
from mllm.encoders.base import MediaEncoder, MediaPreprocessor, as_mono_waveform
from mllm.errors import ConfigError
from mllm.modality import Modality

# Constants of whisper.audio, repeated so that lengths can be computed without importing
# the package (which pulls numba).
SAMPLE_RATE = 16000
CHUNK_SECONDS = 30
NUM_SAMPLES = SAMPLE_RATE * CHUNK_SECONDS           # 480000
HOP_LENGTH = 160                                     # samples per mel frame (10 ms)
NUM_MEL_FRAMES = NUM_SAMPLES // HOP_LENGTH          # 3000
SAMPLES_PER_POSITION = 2 * HOP_LENGTH                # conv2 has stride 2: 20 ms per position


def num_chunks(max_seconds: float | None) -> int:
    """30 s chunks a clip of up to ``max_seconds`` is encoded in (None: one)."""
    return 1 if max_seconds is None else math.ceil(max_seconds / CHUNK_SECONDS)


def check_speech_cut(cfg) -> None:
    """Refuse encoder settings that would trim speech silently, or say two things at once."""
    windowed = cfg.window_seconds is not None or cfg.num_windows != 1
    if cfg.max_seconds is not None:
        if not cfg.max_seconds > 0:
            raise ConfigError(f"the whisper encoder's max_seconds must be positive, got {cfg.max_seconds}")
        if windowed:
            raise ConfigError("the whisper encoder takes either max_seconds (consecutive 30 s chunks) or "
                              "num_windows / window_seconds (windows spread over the clip), not both")
    if cfg.window_seconds is not None and cfg.window_seconds > CHUNK_SECONDS:
        raise ConfigError(f"the whisper encoder reads at most {CHUNK_SECONDS} s per item, so window_seconds="
                          f"{cfg.window_seconds} would be trimmed; use max_seconds for consecutive 30 s chunks")


def _read_checkpoint(path: str) -> dict:
    """An official checkpoint file, memory-mapped: tensors are read only when used."""
    try:
        # mmap: the decoder half of the file (and, for the dims alone, all of it) is never read.
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except FileNotFoundError:
        raise FileNotFoundError(f"Whisper checkpoint not found: {path}") from None
    except RuntimeError:
        # Files in the legacy (non-zip) torch format cannot be memory-mapped.
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(checkpoint, dict) or "dims" not in checkpoint or "model_state_dict" not in checkpoint:
        found = sorted(checkpoint) if isinstance(checkpoint, dict) else type(checkpoint).__name__
        raise ValueError(f"{path}: not an openai-whisper checkpoint "
                         f"(expected keys 'dims' and 'model_state_dict', found {found})")
    return checkpoint


def load_whisper_checkpoint(path: str, dtype: torch.dtype = torch.float32):
    """Build ``whisper.model.AudioEncoder`` from an official checkpoint file.

    Returns ``(audio_encoder, dims)`` with ``dims`` a ``whisper.model.ModelDimensions``.
    """
    from whisper.model import AudioEncoder, ModelDimensions

    checkpoint = _read_checkpoint(path)
    dims = ModelDimensions(**checkpoint["dims"])
    encoder = AudioEncoder(dims.n_mels, dims.n_audio_ctx, dims.n_audio_state, dims.n_audio_head, dims.n_audio_layer)
    prefix = "encoder."
    state = {k[len(prefix):]: v for k, v in checkpoint["model_state_dict"].items() if k.startswith(prefix)}
    result = encoder.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(f"{path}: encoder weights do not match the checkpoint's dims; "
                         f"missing {result.missing_keys[:8]}, unexpected {result.unexpected_keys[:8]}")
    return encoder.to(dtype), dims


class WhisperPreprocessor(MediaPreprocessor):
    """Whisper's per-clip log-mel: 16 kHz mono waveforms -> (N, n_mels, 3000), each padded with
    silence or trimmed to 30 s; the encoder gives ``num_positions`` rows per item."""

    chunk_seconds = CHUNK_SECONDS

    def __init__(self, n_mels: int, num_positions: int = NUM_MEL_FRAMES // 2):
        self.n_mels = n_mels
        self.num_positions = num_positions

    @classmethod
    def from_config(cls, cfg) -> "WhisperPreprocessor":
        """From the checkpoint's ``dims`` (the file is memory-mapped; no weight is read)."""
        check_speech_cut(cfg)
        dims = _read_checkpoint(cfg.path)["dims"]
        return cls(dims["n_mels"], dims["n_audio_ctx"])

    def output_length(self, num_samples: int | None = None) -> int:
        return self.num_positions  # always padded or trimmed to 30 s

    @staticmethod
    def num_valid_positions(num_samples: int) -> int:
        """Positions (20 ms each) that hold real audio for a clip of ``num_samples``."""
        return min(math.ceil(num_samples / SAMPLES_PER_POSITION), NUM_MEL_FRAMES // 2)

    def log_mel(self, waveform) -> torch.Tensor:
        """Whisper log-mel (n_mels, 3000) of one 16 kHz waveform, padded or trimmed to 30 s."""
        from whisper.audio import log_mel_spectrogram, pad_or_trim

        return log_mel_spectrogram(pad_or_trim(as_mono_waveform(waveform), NUM_SAMPLES), n_mels=self.n_mels)

    def preprocess(self, items: Sequence) -> torch.Tensor:
        """Waveforms -> log-mel (N, n_mels, 3000), each padded with silence or trimmed to 30 s.

        This is all the model uses: like the official Whisper (and SALMONN), the padded
        seconds are ordinary input that the encoder and the projector attend to."""
        waveforms = [as_mono_waveform(item) for item in items]
        if not waveforms:
            raise ValueError("preprocess needs at least one waveform")
        return torch.stack([self.log_mel(w) for w in waveforms])

    def preprocess_with_padding_mask(self, items: Sequence) -> tuple[torch.Tensor, torch.Tensor]:
        """Waveforms -> (log-mel (N, n_mels, 3000), frame_padding_mask (N, 3000), True = padding).

        A mel frame is padding when its centre lies past the end of the clip. For analysis and
        for callers that want to mask the padding themselves; ``MultimodalLM`` does not.
        """
        mels = self.preprocess(items)
        valid = torch.tensor([min(math.ceil(as_mono_waveform(w).shape[0] / HOP_LENGTH), NUM_MEL_FRAMES)
                              for w in items])
        padding_mask = torch.arange(NUM_MEL_FRAMES)[None, :] >= valid[:, None]
        return mels, padding_mask


class _Float32LayerNorm(torch.nn.LayerNorm):
    """``whisper.model.LayerNorm`` normalises in float32 but passes the module's own weights,
    which fails ("mixed dtype") once the encoder is cast to bfloat16 / float16; this casts the
    weights too. Same parameters and state-dict keys, identical output in float32."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = None if self.weight is None else self.weight.float()
        bias = None if self.bias is None else self.bias.float()
        return torch.nn.functional.layer_norm(x.float(), self.normalized_shape, weight, bias, self.eps).type(x.dtype)


@register_encoder("whisper")
class WhisperSpeechEncoder(MediaEncoder):
    """Frozen Whisper encoder for speech: 16 kHz mono waveforms -> (N, 1500, n_audio_state).

    ``select_layer``: None or -1 is the encoder output (after ``ln_post``, what SALMONN and
    Qwen-Audio use); 0 is the input to the first block; i > 0 the output of block i.
    """

    modality = Modality.SPEECH
    layers_path = "audio_encoder.blocks"
    attention_projections = ("attn.query", "attn.out")   # openai-whisper's names
    sample_rate = SAMPLE_RATE
    preprocessor_class = WhisperPreprocessor

    def __init__(self, audio_encoder: torch.nn.Module, n_mels: int, select_layer: int | None = None):
        super().__init__()
        for module in audio_encoder.modules():
            if isinstance(module, torch.nn.LayerNorm):  # so that bf16 / fp16 weights work
                module.__class__ = _Float32LayerNorm
        self.audio_encoder = audio_encoder
        self.n_mels = n_mels
        self.preprocessor = WhisperPreprocessor(n_mels, audio_encoder.positional_embedding.shape[0])
        self.hidden_size = audio_encoder.ln_post.weight.shape[0]
        num_layers = len(audio_encoder.blocks)
        self.select_layer = -1 if select_layer is None else select_layer
        if not -(num_layers + 1) <= self.select_layer <= num_layers:
            raise ValueError(f"select_layer={select_layer} is out of range for a Whisper encoder "
                             f"with {num_layers} blocks")

    @classmethod
    def from_config(cls, cfg) -> "WhisperSpeechEncoder":
        check_speech_cut(cfg)
        dtype = getattr(torch, cfg.dtype) if cfg.dtype else torch.float32
        audio_encoder, dims = load_whisper_checkpoint(cfg.path, dtype)
        return cls(audio_encoder, dims.n_mels, select_layer=cfg.select_layer)

    # --- lengths and preprocessing: the preprocessor's (data pipeline; never touches parameters)
    @property
    def num_positions(self) -> int:
        """Encoder positions per item (1500 for 30 s)."""
        return self.audio_encoder.positional_embedding.shape[0]

    num_valid_positions = staticmethod(WhisperPreprocessor.num_valid_positions)

    def log_mel(self, waveform) -> torch.Tensor:
        return self.preprocessor.log_mel(waveform)

    def preprocess_with_padding_mask(self, items: Sequence) -> tuple[torch.Tensor, torch.Tensor]:
        return self.preprocessor.preprocess_with_padding_mask(items)

    # --- encoding
    def _hidden_states(self, mel: torch.Tensor) -> list[torch.Tensor]:
        # whisper.model.AudioEncoder.forward, keeping every block's output.
        encoder = self.audio_encoder
        x = torch.nn.functional.gelu(encoder.conv1(mel))
        x = torch.nn.functional.gelu(encoder.conv2(x)).permute(0, 2, 1)
        x = (x + encoder.positional_embedding).to(x.dtype)
        hidden_states = [x]
        for block in encoder.blocks:
            x = block(x)
            hidden_states.append(x)
        hidden_states[-1] = encoder.ln_post(x)
        return hidden_states

    def forward_with_padding_mask(self, mel: torch.Tensor, frame_padding_mask: torch.Tensor | None = None):
        """(N, n_mels, 3000) -> (features (N, 1500, hidden), position_padding_mask (N, 1500) or None).

        The encoder itself attends to everything (as trained, over zero-padded audio); the mask
        only tells which positions hold no real audio.
        """
        if mel.shape[1:] != (self.n_mels, NUM_MEL_FRAMES):
            raise ValueError(f"Whisper expects log-mel input (N, {self.n_mels}, {NUM_MEL_FRAMES}), "
                             f"got {tuple(mel.shape)}")
        param = self.audio_encoder.conv1.weight
        mel = mel.to(param.device, param.dtype)
        if self.select_layer == -1:
            features = self.audio_encoder(mel)
        else:
            features = self._hidden_states(mel)[self.select_layer]
        position_mask = None
        if frame_padding_mask is not None:
            position_mask = frame_padding_mask.to(features.device).view(mel.shape[0], -1, 2).all(-1)
        return features, position_mask

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        """(N, n_mels, 3000) -> (N, 1500, hidden). Takes no padding mask: the encoder attends to
        all 1500 positions whatever the mask, so accepting one here would silently ignore it;
        ``forward_with_padding_mask`` returns the position mask beside the features."""
        return self.forward_with_padding_mask(mel)[0]
