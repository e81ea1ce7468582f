"""BEATs: official checkpoint layout, Kaldi fbank, the original's numerics, lengths and padding."""

from __future__ import annotations

import math
import warnings
from collections import OrderedDict

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mllm.config import EncoderConfig
from mllm.encoders import ENCODER_REGISTRY, build_encoder
from mllm.encoders.beats import BEATsAudioEncoder, BEATsConfig, BEATsModel, WeightNormConv1d, kaldi_fbank
from mllm.modality import Modality

# A small config with the released checkpoints' architecture flags (post-LN, DeepNorm,
# gated relative position bias) and a classifier head, as fine-tuned checkpoints have.
SMALL = dict(input_patch_size=16, embed_dim=24, conv_bias=False, encoder_layers=2, encoder_embed_dim=32,
             encoder_ffn_embed_dim=64, encoder_attention_heads=4, activation_fn="gelu",
             layer_wise_gradient_decay_ratio=0.6, layer_norm_first=False, deep_norm=True, dropout=0.0,
             attention_dropout=0.0, activation_dropout=0.0, encoder_layerdrop=0.05, dropout_input=0.0,
             conv_pos=8, conv_pos_groups=4, relative_position_embedding=True, num_buckets=16, max_distance=40,
             gru_rel_pos=True, finetuned_model=True, predictor_dropout=0.0, predictor_class=5)


def official_keys(cfg: dict) -> dict[str, tuple[int, ...]]:
    """Key -> shape of an official BEATs checkpoint for ``cfg``, written out from the release layout."""
    e, d, f, h = (cfg["embed_dim"], cfg["encoder_embed_dim"],
                  cfg["encoder_ffn_embed_dim"], cfg["encoder_attention_heads"])
    p, k, g = cfg["input_patch_size"], cfg["conv_pos"], cfg["conv_pos_groups"]
    keys = {
        "patch_embedding.weight": (e, 1, p, p),
        "layer_norm.weight": (e,), "layer_norm.bias": (e,),
        "post_extract_proj.weight": (d, e), "post_extract_proj.bias": (d,),
        "encoder.pos_conv.0.weight_g": (1, 1, k),
        "encoder.pos_conv.0.weight_v": (d, d // g, k),
        "encoder.pos_conv.0.bias": (d,),
        "encoder.layer_norm.weight": (d,), "encoder.layer_norm.bias": (d,),
        "predictor.weight": (cfg["predictor_class"], d), "predictor.bias": (cfg["predictor_class"],),
    }
    for i in range(cfg["encoder_layers"]):
        layer = f"encoder.layers.{i}."
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            keys[f"{layer}self_attn.{proj}.weight"] = (d, d)
            keys[f"{layer}self_attn.{proj}.bias"] = (d,)
        keys[f"{layer}self_attn.relative_attention_bias.weight"] = (cfg["num_buckets"], h)
        keys[f"{layer}self_attn.grep_linear.weight"] = (8, d // h)
        keys[f"{layer}self_attn.grep_linear.bias"] = (8,)
        keys[f"{layer}self_attn.grep_a"] = (1, h, 1, 1)
        for norm in ("self_attn_layer_norm", "final_layer_norm"):
            keys[f"{layer}{norm}.weight"] = (d,)
            keys[f"{layer}{norm}.bias"] = (d,)
        keys[f"{layer}fc1.weight"] = (f, d)
        keys[f"{layer}fc1.bias"] = (f,)
        keys[f"{layer}fc2.weight"] = (d, f)
        keys[f"{layer}fc2.bias"] = (d,)
    return keys


def random_model(seed=0) -> BEATsModel:
    """SMALL BEATs with every parameter random (norm gains, gates and biases too)."""
    torch.manual_seed(seed)
    model = BEATsModel(BEATsConfig.from_dict(SMALL)).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.3 * torch.randn_like(param))
    return model


def save_official(path, model: BEATsModel):
    state = OrderedDict((k, v.clone()) for k, v in model.state_dict().items())
    torch.save({"cfg": dict(SMALL), "model": state, "label_dict": {0: "/m/09x0r"}}, path)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    model = random_model()
    path = tmp_path_factory.mktemp("beats") / "BEATs_small.pt"
    save_official(path, model)
    return str(path), model


def speech_like(num_samples, seed=0):
    rng = np.random.default_rng(seed)
    t = np.arange(num_samples) / 16000
    return (0.3 * np.sin(2 * np.pi * 330 * t) + 0.05 * rng.standard_normal(num_samples)).astype(np.float32)


# --- checkpoint layout and loading -------------------------------------------


def test_state_dict_has_exactly_the_official_keys_and_shapes():
    model = BEATsModel(BEATsConfig.from_dict(SMALL))
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert shapes == official_keys(SMALL)
    # One shared relative-position table, listed once per layer as in the release.
    tables = [layer.self_attn.relative_attention_bias for layer in model.encoder.layers]
    assert all(t is tables[0] for t in tables)


def test_official_checkpoint_loads_strictly_and_reproduces_its_module(checkpoint):
    path, source = checkpoint
    encoder = build_encoder(EncoderConfig(type="beats", path=path))
    assert isinstance(encoder, BEATsAudioEncoder) and encoder.modality is Modality.AUDIO
    assert encoder.hidden_size == SMALL["encoder_embed_dim"] and encoder.label_dict == {0: "/m/09x0r"}
    # The file's state dict loads into a fresh module with strict=True under its own key names.
    loaded = torch.load(path, weights_only=True)
    fresh = BEATsModel(BEATsConfig.from_dict(loaded["cfg"]))
    fresh.load_state_dict(loaded["model"], strict=True)

    fbank = encoder.preprocess([speech_like(16000)])
    assert fbank.shape == (1, 98, 128)
    with torch.no_grad():
        expected, _ = source(fbank)
        assert torch.equal(encoder(fbank), expected)
        assert torch.equal(fresh(fbank)[0], expected)
        assert torch.equal(encoder.model.classify(fbank), source.classify(fbank))
    assert not any(p.requires_grad for p in encoder.parameters())


def test_weight_norm_keys_mean_what_torch_weight_norm_means():
    torch.manual_seed(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        reference = torch.nn.utils.weight_norm(torch.nn.Conv1d(32, 32, 8, padding=4, groups=4), name="weight", dim=2)
    with torch.no_grad():
        reference.weight_g.mul_(torch.rand_like(reference.weight_g) + 0.5)
    ours = WeightNormConv1d(32, 8, groups=4)
    ours.load_state_dict(reference.state_dict(), strict=True)  # weight_g, weight_v, bias
    x = torch.randn(2, 32, 20)
    assert torch.allclose(ours(x), reference(x), atol=1e-6)


def test_bad_checkpoints_fail_with_the_file_name(tmp_path):
    not_beats = tmp_path / "whisper.pt"
    torch.save({"dims": {}, "model_state_dict": {}}, not_beats)
    with pytest.raises(ValueError, match=r"whisper\.pt: not a BEATs checkpoint"):
        build_encoder(EncoderConfig(type="beats", path=str(not_beats)))

    wrong = tmp_path / "wrong_cfg.pt"
    model = BEATsModel(BEATsConfig.from_dict(SMALL))
    torch.save({"cfg": {**SMALL, "encoder_layers": 3}, "model": model.state_dict()}, wrong)
    with pytest.raises(ValueError, match=r"wrong_cfg\.pt: state dict does not match.*encoder\.layers\.2"):
        build_encoder(EncoderConfig(type="beats", path=str(wrong)))

    with pytest.raises(FileNotFoundError, match="missing.pt"):
        build_encoder(EncoderConfig(type="beats", path=str(tmp_path / "missing.pt")))


def test_cfg_missing_an_architecture_key_is_refused_naming_it(tmp_path):
    """The official BEATsConfig fills a missing key with its class default (deep_norm=False),
    ours would fill iter3's (True): the two networks differ, so such a cfg is refused."""
    from mllm.demo.assets import build_tiny_beats
    from mllm.encoders.base import EncoderCheckpointError
    from mllm.encoders.beats import ARCHITECTURE_KEYS
    from mllm.errors import UserError

    model = BEATsModel(BEATsConfig.from_dict(SMALL))
    lacking = tmp_path / "no_deep_norm.pt"
    torch.save({"cfg": {k: v for k, v in SMALL.items() if k != "deep_norm"}, "model": model.state_dict()}, lacking)
    with pytest.raises(EncoderCheckpointError, match=r"no_deep_norm\.pt: the BEATs cfg lacks the architecture "
                                                     r"key\(s\) deep_norm;") as refused:
        build_encoder(EncoderConfig(type="beats", path=str(lacking)))
    assert isinstance(refused.value, UserError)   # one line from the CLI, no traceback

    several = {k: v for k, v in SMALL.items() if k not in ("max_distance", "gru_rel_pos", "predictor_class")}
    with pytest.raises(EncoderCheckpointError, match="max_distance, gru_rel_pos, predictor_class;"):
        BEATsConfig.from_dict(several)
    # Training-only keys may be absent; a pretrained (not fine-tuned) cfg needs no predictor_class.
    minimal = {k: SMALL[k] for k in ARCHITECTURE_KEYS}
    assert BEATsConfig.from_dict({**minimal, "finetuned_model": False}).encoder_layers == SMALL["encoder_layers"]
    # The tiny BEATs the demo writes lists every key, as the released files do.
    demo = torch.load(build_tiny_beats(str(tmp_path / "demo" / "beats.pt")), weights_only=True)
    assert set(ARCHITECTURE_KEYS) <= set(demo["cfg"]) and set(ARCHITECTURE_KEYS) <= set(SMALL)


def test_registry_has_both_audio_encoders():
    assert ENCODER_REGISTRY["beats"].modality is Modality.AUDIO
    assert ENCODER_REGISTRY["whisper"].modality is Modality.SPEECH


# --- numerics of the original ------------------------------------------------


def original_forward(model: BEATsModel, fbank: torch.Tensor) -> torch.Tensor:
    """Eval forward as the original code computes it (time-first layout, bmm attention with
    q / 32 and the row-max trick, gate from the unscaled query, per-layer DeepNorm)."""
    sd, cfg = model.state_dict(), model.config
    heads, dim = cfg.encoder_attention_heads, cfg.encoder_embed_dim
    head_dim, alpha, batch = dim // heads, 32, fbank.shape[0]

    def norm(x, name):
        return F.layer_norm(x, x.shape[-1:], sd[name + ".weight"], sd[name + ".bias"])

    def linear(x, name):
        return F.linear(x, sd[name + ".weight"], sd[name + ".bias"])

    x = F.conv2d(fbank.unsqueeze(1), sd["patch_embedding.weight"], stride=cfg.input_patch_size)
    x = linear(norm(x.reshape(batch, x.shape[1], -1).transpose(1, 2), "layer_norm"), "post_extract_proj")
    v, g = sd["encoder.pos_conv.0.weight_v"], sd["encoder.pos_conv.0.weight_g"]
    conv = F.conv1d(x.transpose(1, 2), g * v / v.norm(dim=(0, 1), keepdim=True), sd["encoder.pos_conv.0.bias"],
                    padding=cfg.conv_pos // 2, groups=cfg.conv_pos_groups)[:, :, :-1]
    x = norm(x + F.gelu(conv).transpose(1, 2), "encoder.layer_norm").transpose(0, 1)     # (T, B, C)
    length = x.shape[0]

    rel = torch.arange(length)[None, :] - torch.arange(length)[:, None]
    half = cfg.num_buckets // 2
    exact = half // 2
    far = exact + (torch.log(rel.abs().float() / exact) / math.log(cfg.max_distance / exact) * (half - exact)).long()
    bucket = (rel > 0).long() * half + torch.where(rel.abs() < exact, rel.abs(), torch.clamp(far, max=half - 1))
    table = sd["encoder.layers.0.self_attn.relative_attention_bias.weight"]
    position_bias = F.embedding(bucket, table).permute(2, 0, 1).repeat(batch, 1, 1)         # (B*H, T, T)

    deep_norm_alpha = (2 * cfg.encoder_layers) ** 0.25
    for i in range(cfg.encoder_layers):
        p = f"encoder.layers.{i}."
        q = linear(x, p + "self_attn.q_proj") * head_dim ** -0.5 / alpha
        q = q.contiguous().view(length, batch * heads, head_dim).transpose(0, 1)
        k = linear(x, p + "self_attn.k_proj").contiguous().view(length, batch * heads, head_dim).transpose(0, 1)
        v = linear(x, p + "self_attn.v_proj").contiguous().view(length, batch * heads, head_dim).transpose(0, 1)
        logits = torch.bmm(q, k.transpose(1, 2))
        logits = (logits - logits.max(dim=-1, keepdim=True)[0]) * alpha
        query = q.view(batch, heads, length, head_dim) * alpha / head_dim ** -0.5
        gate_a, gate_b = torch.sigmoid(linear(query, p + "self_attn.grep_linear")
                                       .view(batch, heads, length, 2, 4).sum(-1)).chunk(2, dim=-1)
        gate = gate_a * (gate_b * sd[p + "self_attn.grep_a"] - 1.0) + 2.0
        logits = logits + gate.view(batch * heads, length, 1) * position_bias
        attended = torch.bmm(F.softmax(logits, dim=-1), v).transpose(0, 1).contiguous().view(length, batch, dim)
        x = norm(x * deep_norm_alpha + linear(attended, p + "self_attn.out_proj"), p + "self_attn_layer_norm")
        hidden = linear(F.gelu(linear(x, p + "fc1")), p + "fc2")
        x = norm(x * deep_norm_alpha + hidden, p + "final_layer_norm")
    return x.transpose(0, 1)


def test_forward_matches_the_original_formulation():
    model = random_model(seed=3)
    fbank = torch.randn(2, 64, 128)
    with torch.no_grad():
        ours, _ = model(fbank)
        expected = original_forward(model, fbank)
    assert ours.shape == (2, 32, SMALL["encoder_embed_dim"])
    assert torch.allclose(ours, expected, atol=1e-5)


# --- fbank -------------------------------------------------------------------


def numpy_kaldi_fbank(signal: np.ndarray) -> np.ndarray:
    """Kaldi's fbank written from its definition, one frame at a time in float64.

    25 ms frames every 10 ms (snip edges), dither 0, remove DC, pre-emphasis 0.97 (first
    sample uses itself), Povey window (Hann ** 0.85), FFT of the frame zero-padded to 512,
    power spectrum, 128 triangular mel filters between 20 Hz and Nyquist on Kaldi's mel scale
    (1127 ln(1 + f / 700)), log with an energy floor of float32 epsilon.
    """
    rate, length, shift, fft_size, num_bins = 16000, 400, 160, 512, 128

    def mel_of(hz):
        return 1127.0 * math.log(1.0 + hz / 700.0)

    low, high = mel_of(20.0), mel_of(rate / 2)
    step = (high - low) / (num_bins + 1)
    filters = np.zeros((num_bins, fft_size // 2 + 1))
    for b in range(num_bins):
        left, center, right = low + b * step, low + (b + 1) * step, low + (b + 2) * step
        for i in range(fft_size // 2):          # Kaldi leaves the Nyquist bin out
            m = mel_of(i * rate / fft_size)
            if left < m < right:
                filters[b, i] = (m - left) / (center - left) if m <= center else (right - m) / (right - center)

    n = np.arange(length)
    povey = (0.5 - 0.5 * np.cos(2 * np.pi * n / (length - 1))) ** 0.85
    out = []
    for start in range(0, len(signal) - length + 1, shift):
        frame = signal[start:start + length].astype(np.float64)
        frame = frame - frame.mean()
        emphasised = np.empty_like(frame)
        emphasised[0] = frame[0] - 0.97 * frame[0]
        emphasised[1:] = frame[1:] - 0.97 * frame[:-1]
        spectrum = np.fft.rfft(emphasised * povey, n=fft_size)
        energies = filters @ (spectrum.real ** 2 + spectrum.imag ** 2)
        out.append(np.log(np.maximum(energies, np.finfo(np.float32).eps)))
    return np.array(out)


@pytest.mark.parametrize("num_samples", [400, 12345, 16000])
def test_fbank_matches_numpy_kaldi_reference(num_samples):
    signal = speech_like(num_samples, seed=num_samples) * 2 ** 15
    signal[: min(800, num_samples) // 2] = 0.0  # a silent stretch exercises the energy floor
    ours = kaldi_fbank(torch.from_numpy(signal)).numpy()
    reference = numpy_kaldi_fbank(signal)
    assert ours.shape == reference.shape == (1 + (num_samples - 400) // 160, 128)
    np.testing.assert_allclose(ours, reference, atol=1e-3, rtol=0)


def test_fbank_rejects_less_than_one_frame():
    with pytest.raises(ValueError, match="at least 400"):
        kaldi_fbank(torch.zeros(399))


# --- lengths and padding -----------------------------------------------------


def test_token_counts_and_short_clips(checkpoint):
    encoder = build_encoder(EncoderConfig(type="beats", path=checkpoint[0]))
    assert encoder.num_tokens(16000) == 48 and encoder.num_tokens(32000) == 96
    assert encoder.min_samples == 2800 and encoder.num_tokens(2800) == 8
    # A clip shorter than one patch (here 50 ms) gets silence appended and still encodes.
    assert encoder.num_tokens(800) == 8
    fbank, mask = encoder.preprocess_with_padding_mask([speech_like(800)])
    assert fbank.shape == (1, 16, 128) and not mask.any()
    with torch.no_grad():
        assert encoder(fbank).shape == (1, 8, encoder.hidden_size)
    with pytest.raises(ValueError, match="1-D mono"):
        encoder.preprocess([np.zeros((2, 16000), np.float32)])


def test_padded_batch_matches_each_clip_alone(checkpoint):
    encoder = build_encoder(EncoderConfig(type="beats", path=checkpoint[0]))
    short, long = speech_like(16000, seed=1), speech_like(36000, seed=2)
    fbank, frame_mask = encoder.preprocess_with_padding_mask([short, torch.from_numpy(long)])
    assert fbank.shape == (2, 223, 128)
    assert frame_mask[0].sum() == 223 - 98 and not frame_mask[1].any()
    with torch.no_grad():
        features, token_mask = encoder.forward_with_padding_mask(fbank, frame_mask)
        alone = [encoder(encoder.preprocess([clip])) for clip in (short, long)]
    assert features.shape == (2, 104, encoder.hidden_size)
    assert (~token_mask).sum(1).tolist() == [48, 104]
    assert torch.allclose(features[0, :48], alone[0][0], atol=1e-5)
    assert torch.allclose(features[1], alone[1][0], atol=1e-5)
    # Padding frames hold what silence gives after log and normalisation.
    assert torch.allclose(fbank[0, 98:], torch.full((125, 128), -2.3917), atol=1e-3)


def test_select_layer(checkpoint):
    path, source = checkpoint
    fbank = torch.randn(1, 32, 128)
    with torch.no_grad():
        hidden = source(fbank, output_hidden_states=True)[0]
        assert len(hidden) == SMALL["encoder_layers"] + 1
        first = build_encoder(EncoderConfig(type="beats", path=path, select_layer=1))(fbank)
        last = build_encoder(EncoderConfig(type="beats", path=path, select_layer=-1))(fbank)
    assert torch.equal(first, hidden[1]) and torch.equal(last, hidden[-1])
    with pytest.raises(ValueError, match="select_layer=5 is out of range"):
        build_encoder(EncoderConfig(type="beats", path=path, select_layer=5))


def test_fbank_of_stacked_waveforms_equals_each_alone(checkpoint):
    """Equal-length clips (an audio item's windows) get their fbank in one pass: the same rows as one by one."""
    waves = [speech_like(16000, seed=seed) for seed in (1, 2, 3)]
    stacked = kaldi_fbank(torch.from_numpy(np.stack(waves)) * 2 ** 15)
    for wave, rows in zip(waves, stacked):
        torch.testing.assert_close(rows, kaldi_fbank(torch.from_numpy(wave) * 2 ** 15), rtol=0, atol=1e-5)
    encoder = build_encoder(EncoderConfig(type="beats", path=checkpoint[0]))
    batch, mask = encoder.preprocess_with_padding_mask(waves)
    torch.testing.assert_close(batch, torch.stack([encoder.fbank(w) for w in waves]), rtol=0, atol=1e-5)
    assert not mask.any()
