"""Q-Former projector shapes, initialisation and the stand-alone checkpoint format."""

from __future__ import annotations

import json

import pytest
import torch

from mllm.projectors import (
    ProjectorCheckpointError,
    ProjectorConfig,
    QFormerProjector,
    build_projectors,
    load_projector_weights,
    load_projectors,
    save_projectors,
)


def _config(**kw):
    base = dict(num_queries=6, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64, dropout=0.0,
                encoder_hidden_size=24, llm_hidden_size=40)
    return ProjectorConfig(**{**base, **kw})


def test_output_shape_queries_and_cross_attention_in_every_layer():
    projector = QFormerProjector(_config())
    out = projector(torch.randn(3, 17, 24))
    assert out.shape == (3, 6, 40)
    assert all(layer.has_cross_attention for layer in projector.qformer.encoder.layer)
    assert len(projector.qformer.encoder.layer) == 2
    # N(0, 0.02) queries: distinct, small
    q = projector.query_tokens
    assert 0.01 < float(q.std()) < 0.03 and not torch.allclose(q[0, 0], q[0, 1])
    assert isinstance(projector.mlp[1], torch.nn.GELU)


def test_output_depends_on_the_encoder_features():
    projector = QFormerProjector(_config()).eval()
    a, b = torch.randn(1, 9, 24), torch.randn(1, 9, 24)
    assert not torch.allclose(projector(a), projector(b))


def test_save_and_load_alone(tmp_path):
    projectors = build_projectors({"visual": _config()})
    save_projectors(projectors, tmp_path)
    assert json.load(open(tmp_path / "projectors.json"))["visual"]["llm_hidden_size"] == 40
    loaded = load_projectors(str(tmp_path))
    x = torch.randn(2, 5, 24)
    projectors.eval(), loaded.eval()
    assert torch.equal(projectors["visual"](x), loaded["visual"](x))


def test_wrong_shape_checkpoint_names_the_tensor(tmp_path):
    save_projectors(build_projectors({"visual": _config(llm_hidden_size=48)}), tmp_path)
    target = build_projectors({"visual": _config()})
    with pytest.raises(ProjectorCheckpointError,
                       match=r"'visual\.mlp\.0\.bias' has shape \(48,\) but the model expects \(40,\)"):
        load_projector_weights(target, str(tmp_path))


def test_other_modality_checkpoint_is_refused(tmp_path):
    save_projectors(build_projectors({"audio": _config()}), tmp_path)
    with pytest.raises(ProjectorCheckpointError, match="do not match"):
        load_projector_weights(build_projectors({"visual": _config()}), str(tmp_path))


def test_missing_checkpoint(tmp_path):
    with pytest.raises(ProjectorCheckpointError, match="not a projector checkpoint"):
        load_projectors(str(tmp_path))


@pytest.mark.parametrize("size, stride", [(5, 4), (4, None), (3, 5)])   # overlapping, touching, with gaps
def test_each_window_is_the_qformer_on_its_slice_alone(size, stride):
    """Window-level Q-Former: output window w == the same Q-Former (no windows) applied to
    encoder positions [w * stride, w * stride + size) alone, with the matching slice of the
    mask. There is no partial last window: positions after the last whole window (and, with
    stride > size, between windows) never reach the output."""
    torch.manual_seed(0)
    windowed = QFormerProjector(_config(num_queries=2, window_size=size, window_stride=stride)).eval()
    whole = QFormerProjector(_config(num_queries=2)).eval()
    whole.load_state_dict(windowed.state_dict())
    length, step = 23, stride or size
    num_windows = (length - size) // step + 1
    features = torch.randn(3, length, 24)
    mask = torch.rand(3, length) > 0.3
    mask[:, ::step] = True  # every window keeps at least its first position
    used = torch.zeros(length, dtype=torch.bool)
    with torch.no_grad():
        out, masked = windowed(features), windowed(features, mask)
        assert out.shape == masked.shape == (3, windowed.num_output_tokens(length), 40) == (3, num_windows * 2, 40)
        for w in range(num_windows):
            window = slice(w * step, w * step + size)
            used[window] = True
            tokens = slice(2 * w, 2 * w + 2)
            torch.testing.assert_close(out[:, tokens], whole(features[:, window]), rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(masked[:, tokens], whole(features[:, window], mask[:, window]),
                                       rtol=1e-5, atol=1e-6)
        assert not used.all() and (num_windows - 1) * step + size <= length
        unused_changed = features.clone()
        unused_changed[:, ~used] += 5 * torch.randn_like(unused_changed[:, ~used])
        torch.testing.assert_close(windowed(unused_changed), out, rtol=0, atol=0)
    with pytest.raises(ValueError, match="longer than the 2 encoder positions"):
        windowed(features[:, :2])
