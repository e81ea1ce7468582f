"""The on-disk cache of frozen encoder outputs: computed once, keyed by media content and
encoder identity, invalidated by any change, unreadable entries recomputed."""

from __future__ import annotations

import glob
import logging
import os

import torch

from mllm.config import config_from_dict
from mllm.model import MultimodalLM
from tests.conftest import model_section


def _model(tiny_assets, cache_dir, **visual) -> MultimodalLM:
    section = model_section(tiny_assets, feature_cache=str(cache_dir))
    section["encoders"]["visual"].update(visual)
    return MultimodalLM.from_config(config_from_dict({"model": section}).model)


def _count_calls(encoder) -> list:
    calls = []
    encoder.register_forward_hook(lambda module, args, out: calls.append(args[0].shape[0]))
    return calls


def _images(model, n=3, seed=0):
    torch.manual_seed(seed)
    return torch.randn(n, *model.processor.dummy_media("<image>").shape[1:])


def _entries(cache_dir):
    return sorted(glob.glob(os.path.join(cache_dir, "visual", "*", "*.safetensors")))


def test_features_are_computed_once_and_read_back_exactly(tiny_assets, tmp_path):
    model = _model(tiny_assets, tmp_path)
    images = _images(model)
    with torch.no_grad():
        plain = model.projectors["visual"](model.encoders["visual"](images))
    calls = _count_calls(model.encoders["visual"])
    first = model.encode_media("<image>", images)
    second = model.encode_media("<image>", images)
    assert calls == [3]  # the second pass read all three from disk
    assert len(_entries(tmp_path)) == 3
    torch.testing.assert_close(first, plain)
    assert torch.equal(first, second)
    # A batch mixing cached and new items encodes only the new one.
    mixed = torch.cat([images[:2], _images(model, 1, seed=1)])
    model.encode_media("<image>", mixed)
    assert calls == [3, 1] and len(_entries(tmp_path)) == 4
    # A fresh model over the same cache (another run) encodes nothing.
    again = _model(tiny_assets, tmp_path)
    calls = _count_calls(again.encoders["visual"])
    again.encode_media("<image>", images)
    assert calls == []


def test_a_changed_encoder_config_or_weights_misses_the_cache(tiny_assets, tmp_path):
    model = _model(tiny_assets, tmp_path)
    images = _images(model)
    model.encode_media("<image>", images)
    other_layer = _model(tiny_assets, tmp_path, select_layer=-1)
    calls = _count_calls(other_layer.encoders["visual"])
    other_layer.encode_media("<image>", images)
    assert calls == [3]
    changed = _model(tiny_assets, tmp_path)
    with torch.no_grad():
        next(changed.encoders["visual"].parameters()).add_(0.01)
    calls = _count_calls(changed.encoders["visual"])
    changed.encode_media("<image>", images)
    assert calls == [3] and len(_entries(tmp_path)) == 9


def test_an_unreadable_entry_is_recomputed(tiny_assets, tmp_path, caplog):
    model = _model(tiny_assets, tmp_path)
    images = _images(model, n=1)
    want = model.encode_media("<image>", images)
    (entry,) = _entries(tmp_path)
    with open(entry, "wb") as f:
        f.write(b"\x00garbage")
    calls = _count_calls(model.encoders["visual"])
    with caplog.at_level(logging.WARNING):
        got = model.encode_media("<image>", images)
    assert calls == [1] and "unreadable" in caplog.text
    torch.testing.assert_close(got, want)
    calls.clear()
    model.encode_media("<image>", images)  # rewritten: read back now
    assert calls == []


def test_the_cache_folder_is_not_saved_with_the_model(tiny_assets, tmp_path):
    model = _model(tiny_assets, tmp_path / "cache")
    model.save_pretrained(str(tmp_path / "out"))
    assert MultimodalLM.from_pretrained(str(tmp_path / "out")).config.feature_cache is None
