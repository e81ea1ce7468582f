"""BEATs audio encoder (Chen et al. 2022, "BEATs: Audio Pre-Training with Acoustic Tokenizers").

Written for this project in plain torch. The module tree reproduces the released iter3 / iter3+
checkpoints (``BEATs_iter3*.pt``, ``{'cfg': dict, 'model': state_dict[, 'label_dict']}``) so
that their state dicts load with ``strict=True`` under their own key names:

* ``encoder.pos_conv.0.weight_g`` / ``weight_v``: the positional convolution keeps the weight-norm
  split of the original (``torch.nn.utils.weight_norm(dim=2)``); :class:`WeightNormConv1d`
  stores both halves and folds them on every forward.
* ``encoder.layers.{i}.self_attn.relative_attention_bias.weight``: one embedding table shared
  by every layer, so the state dict lists it once per layer, as the original does.
* ``predictor.*``: the AudioSet classifier head of fine-tuned checkpoints.

The encoder is frozen and always in eval mode (see ``MediaEncoder``), so dropout, layer-drop
(``encoder_layerdrop``) and the per-layer gradient scaling (``layer_wise_gradient_decay_ratio``)
of the original are training-only and deliberately not implemented; their config fields are
accepted and ignored.

Input pipeline: 16 kHz mono waveform -> Kaldi-style log-mel fbank (128 bins, 25 ms / 10 ms) ->
normalised with the pre-training statistics -> 16x16 patches over (time, mel) -> 8 tokens per
160 ms, time-major (token index = time_patch * 8 + mel_patch).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from mllm.encoders import register_encoder
from mllm.encoders.base import EncoderCheckpointError, MediaEncoder, MediaPreprocessor, as_mono_waveform
from mllm.modality import Modality

SAMPLE_RATE = 16000

# Kaldi fbank settings BEATs was trained with (torchaudio.compliance.kaldi.fbank defaults,
# except num_mel_bins=128 and dither=0).
FBANK_NUM_MEL_BINS = 128
FBANK_FRAME_LENGTH = 400        # 25 ms at 16 kHz
FBANK_FRAME_SHIFT = 160         # 10 ms at 16 kHz
FBANK_FFT_SIZE = 512            # frame zero-padded to the next power of two
FBANK_PREEMPHASIS = 0.97
FBANK_LOW_FREQ = 20.0
FBANK_POVEY_POWER = 0.85
# Waveforms are scaled to the int16 range before the fbank, as in the original recipe.
WAVEFORM_SCALE = 2.0 ** 15
# Normalisation statistics of the pre-training data; note the original divides by 2 * std.
FBANK_MEAN = 15.41663
FBANK_STD = 6.55582
LOG_ENERGY_FLOOR = math.log(torch.finfo(torch.float32).eps)
# What an all-zero (padding) frame becomes after log and normalisation (about -2.392).
PADDING_FBANK_VALUE = (LOG_ENERGY_FLOOR - FBANK_MEAN) / (2 * FBANK_STD)


@dataclass
class BEATsConfig:
    """Architecture of a BEATs model, with the field names of the checkpoint's ``cfg`` dict.

    Defaults are the values of the released iter3 / iter3+ checkpoints (post-LN DeepNorm,
    gated relative position bias with max_distance 800), NOT the defaults of the original
    ``BEATsConfig`` class: building from those gives a different, wrong architecture. For the
    same reason a checkpoint's ``cfg`` must name every architecture field itself
    (:data:`ARCHITECTURE_KEYS`): the original fills a missing one with its class default, these
    defaults would fill in another value, and the two networks would differ.
    """

    input_patch_size: int = 16
    embed_dim: int = 512                    # patch-embedding width
    conv_bias: bool = False
    encoder_layers: int = 12
    encoder_embed_dim: int = 768
    encoder_ffn_embed_dim: int = 3072
    encoder_attention_heads: int = 12
    activation_fn: str = "gelu"
    layer_norm_first: bool = False          # False: post-LN layers
    deep_norm: bool = True                  # residual scaled by (2 * layers) ** 0.25
    conv_pos: int = 128                     # positional convolution kernel size
    conv_pos_groups: int = 16
    relative_position_embedding: bool = True
    num_buckets: int = 320
    max_distance: int = 800
    gru_rel_pos: bool = True                # query-dependent gate on the position bias
    finetuned_model: bool = False           # True: checkpoint has the ``predictor`` head
    predictor_class: int = 527              # AudioSet classes
    # Training-only settings: accepted so checkpoint configs load, unused in eval.
    layer_wise_gradient_decay_ratio: float = 1.0
    dropout: float = 0.0
    attention_dropout: float = 0.0
    activation_dropout: float = 0.0
    encoder_layerdrop: float = 0.0
    dropout_input: float = 0.0
    predictor_dropout: float = 0.0

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = "BEATs cfg") -> "BEATsConfig":
        """Build from a checkpoint ``cfg`` dict; unknown keys (tokenizer settings, ...) are ignored.

        Raises :class:`EncoderCheckpointError` naming ``source`` and every missing architecture
        key (the released files list them all)."""
        missing = [key for key in ARCHITECTURE_KEYS if key not in values]
        if values.get("finetuned_model") and "predictor_class" not in values:
            missing.append("predictor_class")
        if missing:
            raise EncoderCheckpointError(
                f"{source}: the BEATs cfg lacks the architecture key(s) {', '.join(missing)}; the official "
                f"BEATsConfig would fill them with class defaults that differ from the released models' "
                f"values, so the network is ambiguous. Use the released .pt file, or add the keys to its cfg")
        known = {f.name for f in dataclasses.fields(cls)}
        config = cls(**{k: v for k, v in values.items() if k in known})
        if config.activation_fn != "gelu":
            raise EncoderCheckpointError(f"{source}: BEATs activation_fn={config.activation_fn!r} is not "
                                         f"supported (only 'gelu')")
        if config.deep_norm and config.layer_norm_first:
            raise EncoderCheckpointError(f"{source}: BEATs deep_norm requires post-LN layers (layer_norm_first=False)")
        return config

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


#: ``cfg`` keys that shape the network: a checkpoint must give each one (the released files do).
#: The rest of ``BEATsConfig`` is training-only (dropouts, layer-drop, gradient decay).
ARCHITECTURE_KEYS = (
    "input_patch_size", "embed_dim", "conv_bias", "encoder_layers", "encoder_embed_dim", "encoder_ffn_embed_dim",
    "encoder_attention_heads", "activation_fn", "layer_norm_first", "deep_norm", "conv_pos", "conv_pos_groups",
    "relative_position_embedding", "num_buckets", "max_distance", "gru_rel_pos", "finetuned_model",
)


# --------------------------------------------------------------------------- fbank


@functools.lru_cache(maxsize=4)
def kaldi_mel_banks(num_bins: int = FBANK_NUM_MEL_BINS, fft_size: int = FBANK_FFT_SIZE,
                    sample_rate: int = SAMPLE_RATE, low_freq: float = FBANK_LOW_FREQ) -> torch.Tensor:
    """Kaldi's triangular mel filters, (num_bins, fft_size // 2 + 1); the Nyquist column is zero.

    Cached: treat the returned tensor as read-only.
    """

    def mel(freq):
        return 1127.0 * torch.log1p(freq / 700.0)

    high_freq = sample_rate / 2
    mel_low, mel_high = mel(torch.tensor(low_freq)), mel(torch.tensor(high_freq))
    mel_step = (mel_high - mel_low) / (num_bins + 1)
    left = mel_low + torch.arange(num_bins)[:, None] * mel_step
    center, right = left + mel_step, left + 2 * mel_step
    fft_bin_mel = mel(torch.arange(fft_size // 2) * (sample_rate / fft_size))[None, :]
    rising = (fft_bin_mel - left) / (center - left)
    falling = (right - fft_bin_mel) / (right - center)
    banks = torch.clamp(torch.minimum(rising, falling), min=0.0)
    return F.pad(banks, (0, 1))


def kaldi_fbank(waveform: torch.Tensor, mel_banks: torch.Tensor | None = None) -> torch.Tensor:
    """Log-mel filterbank of one waveform (already scaled to the int16 range), (frames, 128); or of
    several of equal length stacked as (N, samples), giving (N, frames, 128) in one pass.

    Same result as ``torchaudio.compliance.kaldi.fbank(w, num_mel_bins=128, frame_length=25,
    frame_shift=10, dither=0.0)``: frames with snip_edges, per-frame DC removal, pre-emphasis,
    Povey window, power spectrum of the frame zero-padded to 512, Kaldi mel banks, log with an
    energy floor of float32 eps.
    """
    if waveform.ndim not in (1, 2):
        raise ValueError(f"kaldi_fbank expects a 1-D waveform or (N, samples), got shape {tuple(waveform.shape)}")
    if waveform.shape[-1] < FBANK_FRAME_LENGTH:
        raise ValueError(f"waveform has {waveform.shape[-1]} samples; the fbank needs at least "
                         f"{FBANK_FRAME_LENGTH} (one 25 ms frame)")
    waveform = waveform.float()
    frames = waveform.unfold(-1, FBANK_FRAME_LENGTH, FBANK_FRAME_SHIFT)    # (..., T, 400)
    frames = frames - frames.mean(dim=-1, keepdim=True)
    previous = torch.cat([frames[..., :1], frames[..., :-1]], dim=-1)      # x[-1] := x[0]
    frames = frames - FBANK_PREEMPHASIS * previous
    window = torch.hann_window(FBANK_FRAME_LENGTH, periodic=False, device=frames.device) ** FBANK_POVEY_POWER
    spectrum = torch.fft.rfft(frames * window, n=FBANK_FFT_SIZE)           # zero-padded to 512
    power = spectrum.real.square() + spectrum.imag.square()                # |X|^2, (..., T, 257)
    if mel_banks is None:
        mel_banks = kaldi_mel_banks()
    mel_energy = power @ mel_banks.to(power.device).T
    return torch.clamp(mel_energy, min=torch.finfo(torch.float32).eps).log()


def _normalised_fbank(waveforms: torch.Tensor) -> torch.Tensor:
    """BEATs' input: the fbank of (..., samples) waveforms in [-1, 1], normalised as in the release."""
    return (kaldi_fbank(waveforms * WAVEFORM_SCALE) - FBANK_MEAN) / (2 * FBANK_STD)


def num_fbank_frames(num_samples: int) -> int:
    """Frames the fbank gives for ``num_samples`` samples (0 when shorter than one frame)."""
    if num_samples < FBANK_FRAME_LENGTH:
        return 0
    return 1 + (num_samples - FBANK_FRAME_LENGTH) // FBANK_FRAME_SHIFT


# --------------------------------------------------------------------------- model


class WeightNormConv1d(nn.Module):
    """Conv1d whose weight is stored as direction ``weight_v`` and gain ``weight_g``.

    Matches ``torch.nn.utils.weight_norm(conv, dim=2)`` of the original, including its state-dict
    keys: ``weight = weight_g * weight_v / ||weight_v||``, the norm taken per kernel position
    (over output and input channels). The norm is computed in float32 so that bf16/fp16
    weights give the same positional features.
    """

    def __init__(self, channels: int, kernel_size: int, groups: int):
        super().__init__()
        self.padding = kernel_size // 2
        self.groups = groups
        self.weight_g = nn.Parameter(torch.ones(1, 1, kernel_size))
        self.weight_v = nn.Parameter(torch.empty(channels, channels // groups, kernel_size))
        self.bias = nn.Parameter(torch.zeros(channels))
        nn.init.normal_(self.weight_v, std=math.sqrt(4 / (kernel_size * channels)))

    def folded_weight(self) -> torch.Tensor:
        direction = self.weight_v.float()
        norm = direction.pow(2).sum(dim=(0, 1), keepdim=True).sqrt()
        return (self.weight_g.float() * direction / norm).to(self.weight_v.dtype)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return F.conv1d(hidden_states, self.folded_weight(), self.bias, padding=self.padding, groups=self.groups)


class DropLastFrame(nn.Module):
    """An even kernel with padding k // 2 yields one frame too many: drop it ("SamePad")."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return hidden_states[:, :, :-1]


def relative_position_buckets(length: int, num_buckets: int, max_distance: int,
                              device: torch.device | None = None) -> torch.Tensor:
    """T5-style bidirectional buckets of ``key - query`` offsets, (length, length) long.

    Half the buckets per direction; of those, the first half are exact offsets and the rest
    grow logarithmically up to ``max_distance`` (larger offsets share the last bucket).
    """
    positions = torch.arange(length, dtype=torch.long, device=device)
    offsets = positions[None, :] - positions[:, None]
    per_direction = num_buckets // 2
    buckets = (offsets > 0).long() * per_direction
    distance = offsets.abs()
    max_exact = per_direction // 2
    log_ratio = torch.log(distance.float().clamp(min=1) / max_exact) / math.log(max_distance / max_exact)
    far_bucket = (max_exact + (log_ratio * (per_direction - max_exact)).long()).clamp(max=per_direction - 1)
    return buckets + torch.where(distance < max_exact, distance, far_bucket)


class BEATsSelfAttention(nn.Module):
    """Multi-head self-attention with BEATs' gated relative position bias.

    The original scales the logits in a numerically careful way (q / 32, subtract the row max,
    x 32); that is the plain scaled dot product, so this uses ``scaled_dot_product_attention``
    with the position bias (and the key padding) as an additive mask.
    """

    def __init__(self, config: BEATsConfig):
        super().__init__()
        self.num_heads = config.encoder_attention_heads
        self.head_dim = config.encoder_embed_dim // self.num_heads
        dim = config.encoder_embed_dim
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)
        self.gru_rel_pos = config.gru_rel_pos
        if config.gru_rel_pos:
            # Per head: 8 outputs summed in two groups of 4 -> the two gate logits.
            self.grep_linear = nn.Linear(self.head_dim, 8)
            self.grep_a = nn.Parameter(torch.ones(1, self.num_heads, 1, 1))
        # Set by BEATsEncoder to the one table shared by all layers (kept here for the key names).
        self.relative_attention_bias: nn.Embedding | None = None

    def forward(self, hidden_states: torch.Tensor, position_bias: torch.Tensor | None,
                key_padding_mask: torch.Tensor | None) -> torch.Tensor:
        batch, length, dim = hidden_states.shape

        def split_heads(x):
            return x.view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)

        query = split_heads(self.q_proj(hidden_states))
        key = split_heads(self.k_proj(hidden_states))
        value = split_heads(self.v_proj(hidden_states))

        attn_bias = None
        if position_bias is not None:                                   # (H, L, L)
            attn_bias = position_bias.unsqueeze(0).to(query.dtype)
            if self.gru_rel_pos:
                # The gate reads the unscaled projected query of each position and head.
                gate_logits = self.grep_linear(query).view(batch, self.num_heads, length, 2, 4).sum(-1)
                gate_a, gate_b = torch.sigmoid(gate_logits).chunk(2, dim=-1)
                gate = gate_a * (gate_b * self.grep_a - 1.0) + 2.0     # (B, H, L, 1)
                attn_bias = gate * attn_bias
        if key_padding_mask is not None and key_padding_mask.any():
            padding_bias = torch.zeros(batch, 1, 1, length, dtype=query.dtype, device=query.device)
            padding_bias = padding_bias.masked_fill(key_padding_mask[:, None, None, :], torch.finfo(query.dtype).min)
            attn_bias = padding_bias if attn_bias is None else attn_bias + padding_bias

        attended = F.scaled_dot_product_attention(query, key, value, attn_mask=attn_bias)
        return self.out_proj(attended.transpose(1, 2).reshape(batch, length, dim))


class BEATsEncoderLayer(nn.Module):
    def __init__(self, config: BEATsConfig):
        super().__init__()
        self.self_attn = BEATsSelfAttention(config)
        self.self_attn_layer_norm = nn.LayerNorm(config.encoder_embed_dim)
        self.fc1 = nn.Linear(config.encoder_embed_dim, config.encoder_ffn_embed_dim)
        self.fc2 = nn.Linear(config.encoder_ffn_embed_dim, config.encoder_embed_dim)
        self.final_layer_norm = nn.LayerNorm(config.encoder_embed_dim)
        self.layer_norm_first = config.layer_norm_first
        # DeepNorm (Wang et al. 2022): up-weight the residual branch of post-LN layers.
        self.residual_scale = (2 * config.encoder_layers) ** 0.25 if config.deep_norm else 1.0

    def feed_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        # GELU in float32 as in the original.
        activated = F.gelu(self.fc1(hidden_states).float()).type_as(hidden_states)
        return self.fc2(activated)

    def forward(self, hidden_states, position_bias, key_padding_mask):
        if self.layer_norm_first:
            hidden_states = hidden_states + self.self_attn(
                self.self_attn_layer_norm(hidden_states), position_bias, key_padding_mask)
            return hidden_states + self.feed_forward(self.final_layer_norm(hidden_states))
        attended = self.self_attn(hidden_states, position_bias, key_padding_mask)
        hidden_states = self.self_attn_layer_norm(hidden_states * self.residual_scale + attended)
        return self.final_layer_norm(hidden_states * self.residual_scale + self.feed_forward(hidden_states))


class BEATsEncoder(nn.Module):
    """Positional convolution + transformer layers (``encoder.*`` keys)."""

    def __init__(self, config: BEATsConfig):
        super().__init__()
        dim = config.encoder_embed_dim
        # Sequential so the keys read ``pos_conv.0.weight_g``; index 2 is the GELU.
        self.pos_conv = nn.Sequential(WeightNormConv1d(dim, config.conv_pos, config.conv_pos_groups),
                                      DropLastFrame(), nn.GELU())
        self.layer_norm = nn.LayerNorm(dim)
        self.layers = nn.ModuleList(BEATsEncoderLayer(config) for _ in range(config.encoder_layers))
        self.layer_norm_first = config.layer_norm_first
        self.num_buckets = config.num_buckets
        self.max_distance = config.max_distance
        if config.relative_position_embedding:
            # One table for all layers; every layer holds it so each lists it in the state dict.
            shared = nn.Embedding(config.num_buckets, config.encoder_attention_heads)
            for layer in self.layers:
                layer.self_attn.relative_attention_bias = shared

    def position_bias(self, length: int, device) -> torch.Tensor | None:
        table = self.layers[0].self_attn.relative_attention_bias
        if table is None:
            return None
        buckets = relative_position_buckets(length, self.num_buckets, self.max_distance, device)
        return table(buckets).permute(2, 0, 1)                               # (H, L, L)

    def forward(self, hidden_states: torch.Tensor, padding_mask: torch.Tensor | None = None,
                output_hidden_states: bool = False):
        """Returns the last hidden states, or with ``output_hidden_states`` the list of the
        input to layer 0 followed by every layer's output."""
        if padding_mask is not None:
            hidden_states = hidden_states.masked_fill(padding_mask.unsqueeze(-1), 0.0)
        hidden_states = hidden_states + self.pos_conv(hidden_states.transpose(1, 2)).transpose(1, 2)
        if not self.layer_norm_first:
            hidden_states = self.layer_norm(hidden_states)
        position_bias = self.position_bias(hidden_states.shape[1], hidden_states.device)
        all_hidden_states = [hidden_states]
        for layer in self.layers:
            hidden_states = layer(hidden_states, position_bias, padding_mask)
            all_hidden_states.append(hidden_states)
        if self.layer_norm_first:
            hidden_states = self.layer_norm(hidden_states)
            all_hidden_states[-1] = hidden_states
        return all_hidden_states if output_hidden_states else hidden_states


class BEATsModel(nn.Module):
    """The BEATs network on normalised fbank input; state-dict keys as in the released files."""

    def __init__(self, config: BEATsConfig):
        super().__init__()
        self.config = config
        patch = config.input_patch_size
        self.patch_embedding = nn.Conv2d(1, config.embed_dim, kernel_size=patch, stride=patch,
                                         bias=config.conv_bias)
        self.layer_norm = nn.LayerNorm(config.embed_dim)
        self.post_extract_proj = (nn.Linear(config.embed_dim, config.encoder_embed_dim)
                                  if config.embed_dim != config.encoder_embed_dim else None)
        self.encoder = BEATsEncoder(config)
        self.predictor = (nn.Linear(config.encoder_embed_dim, config.predictor_class)
                          if config.finetuned_model else None)

    @property
    def tokens_per_patch_column(self) -> int:
        return FBANK_NUM_MEL_BINS // self.config.input_patch_size

    def token_padding_mask(self, frame_padding_mask: torch.Tensor) -> torch.Tensor:
        """(B, frames) -> (B, tokens): a token is padding when any frame of its patch is.

        A clip alone drops the trailing frames that do not fill a patch; treating a partly
        padded patch as padding does the same in a batch, so each clip's real tokens come out
        as they do when it is encoded alone. (The original groups consecutive frames, not
        patches, when it reduces the mask: only padded batches differ.)
        """
        patch = self.config.input_patch_size
        num_patches = frame_padding_mask.shape[1] // patch
        per_patch = frame_padding_mask[:, : num_patches * patch].view(-1, num_patches, patch).any(-1)
        return per_patch.repeat_interleave(self.tokens_per_patch_column, dim=1)

    def embed_patches(self, fbank: torch.Tensor) -> torch.Tensor:
        """(B, frames, 128) -> (B, tokens, encoder_embed_dim), tokens time-major."""
        patches = self.patch_embedding(fbank.unsqueeze(1))                  # (B, C, T', 8)
        patches = patches.flatten(2).transpose(1, 2)
        patches = self.layer_norm(patches)
        if self.post_extract_proj is not None:
            patches = self.post_extract_proj(patches)
        return patches

    def forward(self, fbank: torch.Tensor, frame_padding_mask: torch.Tensor | None = None,
                output_hidden_states: bool = False):
        """Returns ``(features, token_padding_mask)``; features is the last hidden state
        (B, tokens, dim), or with ``output_hidden_states`` the list of all of them."""
        if fbank.shape[1] < self.config.input_patch_size:
            raise ValueError(f"BEATs needs at least {self.config.input_patch_size} fbank frames, "
                             f"got {fbank.shape[1]}")
        padding_mask = None
        if frame_padding_mask is not None:
            padding_mask = self.token_padding_mask(frame_padding_mask.to(fbank.device))
        features = self.encoder(self.embed_patches(fbank), padding_mask, output_hidden_states)
        return features, padding_mask

    def classify(self, fbank: torch.Tensor, frame_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """AudioSet probabilities (B, classes) of a fine-tuned checkpoint: per-token logits
        averaged over non-padding tokens, then a sigmoid."""
        if self.predictor is None:
            raise ValueError("this BEATs checkpoint has no classifier head (not a fine-tuned model)")
        features, padding_mask = self(fbank, frame_padding_mask)
        logits = self.predictor(features)
        if padding_mask is None:
            return torch.sigmoid(logits.mean(dim=1))
        keep = (~padding_mask).unsqueeze(-1).to(logits.dtype)
        return torch.sigmoid((logits * keep).sum(1) / keep.sum(1).clamp(min=1))


def _read_checkpoint(path: str, mmap: bool = False) -> dict:
    try:
        # mmap (for the cfg alone): no tensor is read from the file.
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except FileNotFoundError:
        raise FileNotFoundError(f"BEATs checkpoint not found: {path}") from None
    except RuntimeError:
        if not mmap:
            raise
        # Files in the legacy (non-zip) torch format cannot be memory-mapped.
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(checkpoint, dict) or "cfg" not in checkpoint or "model" not in checkpoint:
        found = sorted(checkpoint) if isinstance(checkpoint, dict) else type(checkpoint).__name__
        raise EncoderCheckpointError(f"{path}: not a BEATs checkpoint (expected keys 'cfg' and 'model', "
                                     f"found {found})")
    return checkpoint


def load_beats_checkpoint(path: str, dtype: torch.dtype = torch.float32) -> tuple[BEATsModel, dict]:
    """Load an official BEATs ``.pt`` file; returns the model and the ``label_dict`` (may be empty)."""
    checkpoint = _read_checkpoint(path)
    config = BEATsConfig.from_dict(checkpoint["cfg"], source=path)
    model = BEATsModel(config)
    result = model.load_state_dict(checkpoint["model"], strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise EncoderCheckpointError(f"{path}: state dict does not match the BEATs config in the file; "
                                     f"missing {result.missing_keys[:8]}, unexpected {result.unexpected_keys[:8]}")
    return model.to(dtype), dict(checkpoint.get("label_dict") or {})


class BEATsPreprocessor(MediaPreprocessor):
    """BEATs' normalised Kaldi fbank of 16 kHz mono waveforms; 8 tokens per 16-frame patch column."""

    def __init__(self, input_patch_size: int = 16):
        self.input_patch_size = input_patch_size

    @classmethod
    def from_config(cls, cfg) -> "BEATsPreprocessor":
        """From the checkpoint's ``cfg`` (the file is memory-mapped; no weight is read)."""
        config = BEATsConfig.from_dict(_read_checkpoint(cfg.path, mmap=True)["cfg"], source=cfg.path)
        return cls(config.input_patch_size)

    @property
    def min_samples(self) -> int:
        """Shortest waveform giving one patch column (16 frames): 2800 samples."""
        return FBANK_FRAME_LENGTH + (self.input_patch_size - 1) * FBANK_FRAME_SHIFT

    def num_tokens(self, num_samples: int) -> int:
        """Tokens for a waveform of ``num_samples`` (after padding to ``min_samples``):
        8 per 16 fbank frames, trailing frames that do not fill a patch dropped."""
        frames = num_fbank_frames(max(num_samples, self.min_samples))
        return frames // self.input_patch_size * (FBANK_NUM_MEL_BINS // self.input_patch_size)

    def output_length(self, num_samples: int | None = None) -> int:
        if num_samples is None:
            raise ValueError("BEATs output length depends on the clip: set the audio encoder's "
                             "window_seconds so every item has the same length")
        return self.num_tokens(num_samples)

    def fbank(self, waveform) -> torch.Tensor:
        """Normalised fbank (frames, 128) of one 16 kHz waveform."""
        return _normalised_fbank(as_mono_waveform(waveform))

    def preprocess_with_padding_mask(self, items: Sequence) -> tuple[torch.Tensor, torch.Tensor]:
        """Waveforms -> (fbank (N, frames, 128), frame_padding_mask (N, frames), True = padding).

        Each item's fbank is computed on its own samples and padded to the longest with the
        value silence gives, so a padded batch matches per-item results on the real frames.
        """
        waveforms = [as_mono_waveform(item) for item in items]
        if not waveforms:
            raise ValueError("preprocess needs at least one waveform")
        # Silence appended as content (not padding) to a clip shorter than one patch, so it still gets one.
        waveforms = [F.pad(w, (0, self.min_samples - w.shape[0])) if w.shape[0] < self.min_samples else w
                     for w in waveforms]
        if len({w.shape[0] for w in waveforms}) == 1:   # e.g. a clip's windows: one pass for all
            fbanks = list(_normalised_fbank(torch.stack(waveforms)))
        else:
            fbanks = [self.fbank(w) for w in waveforms]
        valid_frames = [f.shape[0] for f in fbanks]
        max_frames = max(f.shape[0] for f in fbanks)
        batch = torch.full((len(fbanks), max_frames, FBANK_NUM_MEL_BINS), PADDING_FBANK_VALUE)
        padding_mask = torch.ones(len(fbanks), max_frames, dtype=torch.bool)
        for i, (fbank, valid) in enumerate(zip(fbanks, valid_frames)):
            batch[i, : fbank.shape[0]] = fbank
            padding_mask[i, :valid] = False
        return batch, padding_mask

    def preprocess(self, items: Sequence) -> torch.Tensor:
        """Waveforms -> padded normalised fbank (N, frames, 128)."""
        return self.preprocess_with_padding_mask(items)[0]


# --------------------------------------------------------------------------- media encoder


@register_encoder("beats")
class BEATsAudioEncoder(MediaEncoder):
    """Frozen BEATs for general audio. ``cfg.path`` is an official ``.pt`` checkpoint.

    Items are 16 kHz mono waveforms (1-D numpy arrays or tensors, floats in [-1, 1]).
    Clips shorter than one patch (``min_samples`` = 2800, 175 ms) get silence appended up to
    it. In a batch of unequal clips, ``preprocess_with_padding_mask`` returns the frame
    padding mask and ``forward_with_padding_mask`` the token padding mask; padded tokens are
    kept out of attention, so each clip's real tokens match encoding it alone.
    """

    modality = Modality.AUDIO
    layers_path = "model.encoder.layers"
    sample_rate = SAMPLE_RATE
    preprocessor_class = BEATsPreprocessor

    def __init__(self, model: BEATsModel, select_layer: int | None = None, label_dict: dict | None = None):
        super().__init__()
        self.model = model
        self.preprocessor = BEATsPreprocessor(model.config.input_patch_size)
        self.hidden_size = model.config.encoder_embed_dim
        self.label_dict = label_dict or {}
        num_layers = model.config.encoder_layers
        self.select_layer = -1 if select_layer is None else select_layer
        if not -(num_layers + 1) <= self.select_layer <= num_layers:
            raise ValueError(f"select_layer={select_layer} is out of range for BEATs with {num_layers} layers")

    @classmethod
    def from_config(cls, cfg) -> "BEATsAudioEncoder":
        dtype = getattr(torch, cfg.dtype) if cfg.dtype else torch.float32
        model, label_dict = load_beats_checkpoint(cfg.path, dtype)
        return cls(model, select_layer=cfg.select_layer, label_dict=label_dict)

    # --- lengths and preprocessing: the preprocessor's (data pipeline; never touches parameters)
    @property
    def min_samples(self) -> int:
        return self.preprocessor.min_samples

    def num_tokens(self, num_samples: int) -> int:
        return self.preprocessor.num_tokens(num_samples)

    def fbank(self, waveform) -> torch.Tensor:
        return self.preprocessor.fbank(waveform)

    def preprocess_with_padding_mask(self, items: Sequence) -> tuple[torch.Tensor, torch.Tensor]:
        return self.preprocessor.preprocess_with_padding_mask(items)

    # --- encoding
    def forward_with_padding_mask(self, fbank: torch.Tensor, frame_padding_mask: torch.Tensor | None = None):
        """(N, frames, 128) -> (features (N, tokens, hidden), token_padding_mask (N, tokens) or None)."""
        param = self.model.patch_embedding.weight
        fbank = fbank.to(param.device, param.dtype)
        if self.select_layer == -1:
            return self.model(fbank, frame_padding_mask)
        all_hidden, token_mask = self.model(fbank, frame_padding_mask, output_hidden_states=True)
        return all_hidden[self.select_layer], token_mask

    def forward(self, fbank: torch.Tensor, frame_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.forward_with_padding_mask(fbank, frame_padding_mask)[0]
