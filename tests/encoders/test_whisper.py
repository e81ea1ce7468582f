"""Whisper: official checkpoint files (80 and 128 mel bins), per-clip log-mel, lengths."""

from __future__ import annotations

from dataclasses import asdict

import numpy as np
import pytest
import torch
import whisper
from whisper.model import ModelDimensions, Whisper

from mllm.config import EncoderConfig
from mllm.encoders import build_encoder
from mllm.encoders.whisper import WhisperSpeechEncoder
from mllm.modality import Modality


def write_checkpoint(path, n_mels: int, seed: int = 0):
    """A tiny random Whisper saved the way the official files are: {'dims', 'model_state_dict'}."""
    torch.manual_seed(seed)
    dims = ModelDimensions(n_mels=n_mels, n_audio_ctx=1500, n_audio_state=32, n_audio_head=4, n_audio_layer=2,
                           n_vocab=120, n_text_ctx=16, n_text_state=32, n_text_head=4, n_text_layer=1)
    model = Whisper(dims).eval()
    torch.save({"dims": asdict(dims), "model_state_dict": model.state_dict()}, path)
    return model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("whisper") / "tiny.pt"
    return str(path), write_checkpoint(path, n_mels=80)


def clip(seconds, amplitude=0.3, seed=0):
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * 16000)) / 16000
    return (amplitude * np.sin(2 * np.pi * 220 * t) + 0.01 * rng.standard_normal(t.size)).astype(np.float32)


def test_official_checkpoint_loads_and_matches_the_package_model(tiny):
    path, reference = tiny
    encoder = build_encoder(EncoderConfig(type="whisper", path=path))
    assert isinstance(encoder, WhisperSpeechEncoder) and encoder.modality is Modality.SPEECH
    assert encoder.hidden_size == 32 and encoder.n_mels == 80 and encoder.num_positions == 1500
    mel = encoder.preprocess([clip(1.0)])
    assert mel.shape == (1, 80, 3000)
    with torch.no_grad():
        assert torch.allclose(encoder(mel), reference.encoder(mel), atol=1e-6)
        # The package's own loader reads the same file (offline, from a path).
        packaged = whisper.load_model(path, device="cpu")
        assert torch.allclose(encoder(mel), packaged.encoder(mel), atol=1e-6)
    assert not any(p.requires_grad for p in encoder.parameters()) and not encoder.training


def test_large_v3_family_uses_128_mel_bins(tmp_path):
    path = tmp_path / "large-v3-like.pt"
    reference = write_checkpoint(path, n_mels=128, seed=1)
    encoder = build_encoder(EncoderConfig(type="whisper", path=str(path)))
    mel = encoder.preprocess([clip(2.0)])
    assert mel.shape == (1, 128, 3000)
    with torch.no_grad():
        assert torch.allclose(encoder(mel), reference.encoder(mel), atol=1e-6)


def test_log_mel_is_computed_per_clip(tiny):
    encoder = build_encoder(EncoderConfig(type="whisper", path=tiny[0]))
    loud, quiet = clip(3.0, amplitude=0.9, seed=1), clip(1.0, amplitude=0.001, seed=2)
    batch = encoder.preprocess([loud, quiet])
    assert torch.allclose(batch[1], encoder.preprocess([quiet])[0])
    # The package's batched call would normalise the quiet clip by the loud clip's maximum.
    from whisper.audio import log_mel_spectrogram, pad_or_trim

    together = log_mel_spectrogram(pad_or_trim(torch.from_numpy(np.stack([pad_to(loud), pad_to(quiet)]))))
    assert not torch.allclose(together[1], batch[1])


def pad_to(waveform, length=480000):
    return np.pad(waveform, (0, length - waveform.size))


def test_long_clips_are_trimmed_and_padding_is_marked(tiny):
    encoder = build_encoder(EncoderConfig(type="whisper", path=tiny[0]))
    mel, frame_mask = encoder.preprocess_with_padding_mask([clip(1.0), clip(31.0)])
    assert mel.shape == (2, 80, 3000)
    assert (~frame_mask).sum(1).tolist() == [100, 3000]
    with torch.no_grad():
        features, position_mask = encoder.forward_with_padding_mask(mel, frame_mask)
    assert features.shape == (2, 1500, 32)
    assert (~position_mask).sum(1).tolist() == [50, 1500]
    assert encoder.num_valid_positions(16000) == 50 and encoder.num_valid_positions(10 ** 7) == 1500
    with pytest.raises(ValueError, match=r"expects log-mel input \(N, 80, 3000\)"):
        encoder(torch.zeros(1, 80, 100))


def test_select_layer(tiny):
    path, reference = tiny
    mel = torch.randn(1, 80, 3000)
    with torch.no_grad():
        default = build_encoder(EncoderConfig(type="whisper", path=path))(mel)
        last = build_encoder(EncoderConfig(type="whisper", path=path, select_layer=-1))(mel)
        first_block = build_encoder(EncoderConfig(type="whisper", path=path, select_layer=1))(mel)
        x = torch.nn.functional.gelu(reference.encoder.conv1(mel))
        x = (torch.nn.functional.gelu(reference.encoder.conv2(x)).permute(0, 2, 1)
             + reference.encoder.positional_embedding)
        expected_first = reference.encoder.blocks[0](x)
    assert torch.equal(default, last)
    assert torch.allclose(first_block, expected_first, atol=1e-6)
    with pytest.raises(ValueError, match="out of range"):
        build_encoder(EncoderConfig(type="whisper", path=path, select_layer=3))


def test_bad_checkpoints_fail_with_the_file_name(tmp_path, tiny):
    beats_like = tmp_path / "beats.pt"
    torch.save({"cfg": {}, "model": {}}, beats_like)
    with pytest.raises(ValueError, match=r"beats\.pt: not an openai-whisper checkpoint"):
        build_encoder(EncoderConfig(type="whisper", path=str(beats_like)))

    checkpoint = torch.load(tiny[0], weights_only=True)
    checkpoint["dims"]["n_audio_layer"] = 3
    wrong = tmp_path / "wrong_dims.pt"
    torch.save(checkpoint, wrong)
    with pytest.raises(ValueError, match=r"wrong_dims\.pt: encoder weights do not match.*blocks\.2"):
        build_encoder(EncoderConfig(type="whisper", path=str(wrong)))

    with pytest.raises(FileNotFoundError, match="large-v3"):
        build_encoder(EncoderConfig(type="whisper", path="large-v3"))


def test_the_model_path_computes_no_padding_mask_and_forward_takes_none(tiny):
    """``preprocess`` (what the data pipeline calls) is the log-mel alone; ``forward`` has no
    mask argument, since the encoder attends to all 1500 positions and would ignore one."""
    encoder = build_encoder(EncoderConfig(type="whisper", path=tiny[0]))
    clips = [clip(1.0), clip(2.5, seed=1)]
    mel = encoder.preprocess(clips)
    assert torch.is_tensor(mel) and mel.shape == (2, 80, 3000)
    with_mask, frame_mask = encoder.preprocess_with_padding_mask(clips)
    assert torch.equal(mel, with_mask) and (~frame_mask).sum(1).tolist() == [100, 250]
    with pytest.raises(TypeError):
        encoder(mel, frame_mask)


def test_bfloat16_encoder_runs_and_stays_close_to_float32(tiny):
    """``dtype: bfloat16`` casts every weight, LayerNorms included; whisper's LayerNorm alone
    would then fail on a float32 input ("mixed dtype")."""
    path, reference = tiny
    half = build_encoder(EncoderConfig(type="whisper", path=path, dtype="bfloat16"))
    assert half.audio_encoder.ln_post.weight.dtype == torch.bfloat16
    mel = half.preprocess([clip(2.0)])
    with torch.no_grad():
        out = half(mel)
        expected = reference.encoder(mel)
    assert out.dtype == torch.bfloat16 and out.shape == (1, 1500, 32)
    assert float((out.float() - expected).abs().max()) < 0.1 * float(expected.abs().max())


def test_speech_cut_settings_that_would_trim_silently_or_conflict_are_refused(tiny, tmp_path):
    """max_seconds chunks Whisper input; a window longer than 30 s would be trimmed inside
    Whisper, and BEATs has no fixed input length to chunk by."""
    from mllm.config import ConfigError
    from mllm.demo.assets import build_tiny_beats
    from mllm.encoders.whisper import num_chunks

    path = tiny[0]
    assert [num_chunks(s) for s in (None, 30, 30.5, 70, 90)] == [1, 1, 2, 3, 3]
    assert build_encoder(EncoderConfig(type="whisper", path=path, max_seconds=90)).chunk_seconds == 30
    with pytest.raises(ConfigError, match="either max_seconds .* or num_windows / window_seconds"):
        build_encoder(EncoderConfig(type="whisper", path=path, max_seconds=60, num_windows=2, window_seconds=10))
    with pytest.raises(ConfigError, match="window_seconds=45 would be trimmed; use max_seconds"):
        build_encoder(EncoderConfig(type="whisper", path=path, window_seconds=45))
    with pytest.raises(ConfigError, match="max_seconds must be positive"):
        build_encoder(EncoderConfig(type="whisper", path=path, max_seconds=0))
    beats = build_tiny_beats(str(tmp_path / "beats.pt"))
    with pytest.raises(ConfigError, match="'beats' takes no max_seconds"):
        build_encoder(EncoderConfig(type="beats", path=beats, max_seconds=60))
