"""The media processor builds from a saved checkpoint folder without the LLM (nor CLIP's weights)
and prepares every kind of media exactly as the model's own processor does."""

from __future__ import annotations

import glob
import json
import os
import shutil

import numpy as np
import pytest
import torch

from mllm.config import config_from_dict
from mllm.data.dataset import MultimodalDataset
from mllm.data.media import write_audio, write_video
from mllm.data.processor import MediaProcessor
from mllm.model import MultimodalLM
from tests.conftest import TINY_PROJECTOR, model_section
from tests.encoders.test_beats import random_model, save_official
from tests.encoders.test_whisper import write_checkpoint

WEIGHT_FILES = ("*.safetensors", "*.bin")


def _sine(seconds, hz):
    t = np.arange(int(seconds * 16000)) / 16000
    return (0.3 * np.sin(2 * np.pi * hz * t)).astype(np.float32)


@pytest.fixture(scope="module")
def saved(tiny_assets, tmp_path_factory):
    """A model with image / video, audio (BEATs, 3 windows) and speech (Whisper, 2 chunks of 30 s)
    saved to a folder; then the LLM's and CLIP's weight files are deleted."""
    root = tmp_path_factory.mktemp("processor")
    llm, clip = shutil.copytree(tiny_assets["llm"], root / "llm"), shutil.copytree(tiny_assets["clip"], root / "clip")
    save_official(root / "beats.pt", random_model())
    write_checkpoint(root / "whisper.pt", n_mels=80)
    section = model_section({"llm": str(llm), "clip": str(clip)})
    section["encoders"]["audio"] = {"type": "beats", "path": str(root / "beats.pt"),
                                    "num_windows": 3, "window_seconds": 1.0}
    section["encoders"]["speech"] = {"type": "whisper", "path": str(root / "whisper.pt"), "max_seconds": 60}
    section["projectors"]["audio"] = dict(TINY_PROJECTOR)
    section["projectors"]["speech"] = dict(TINY_PROJECTOR, num_queries=1, window_size=100, window_stride=100)
    torch.manual_seed(0)
    model = MultimodalLM.from_config(config_from_dict({"model": section}).model)
    model.save_pretrained(str(root / "checkpoint"))
    removed = [path for folder in (llm, clip) for pattern in WEIGHT_FILES for path in glob.glob(f"{folder}/{pattern}")]
    assert removed
    for path in removed:
        os.remove(path)
    media = {"image": str(root / "red.png"), "video": str(root / "clip.mp4"), "audio": str(root / "beep.wav"),
             "speech": str(root / "talk.flac")}
    from PIL import Image

    Image.new("RGB", (40, 30), (200, 10, 10)).save(media["image"])
    rng = np.random.default_rng(0)
    write_video(media["video"], [rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for _ in range(5)])
    write_audio(media["audio"], _sine(2.5, 440))
    write_audio(media["speech"], _sine(40.0, 200))
    return {"model": model, "checkpoint": str(root / "checkpoint"), "media": media, "root": root}


def test_a_checkpoint_folder_gives_the_models_tensors_and_token_counts_without_the_llm(saved):
    model = saved["model"]
    # The LLM's weights are gone: the model cannot load any more.
    with pytest.raises(OSError, match=r"no file named model\.safetensors.*llm"):
        MultimodalLM.from_pretrained(saved["checkpoint"])
    processor = MediaProcessor.from_pretrained(saved["checkpoint"])
    assert type(processor) is MediaProcessor
    assert processor.supported_placeholders == model.supported_placeholders == ["<image>", "<video>", "<audio>",
                                                                                 "<speech>"]
    assert processor.placeholder_ids == model.placeholder_ids
    # image: 4 queries; video: 2 frames x 4; audio: 3 windows x 4; speech: 2 chunks x 15 windows x 1 query.
    counts = {ph: processor.num_media_tokens(ph) for ph in processor.supported_placeholders}
    assert counts == {"<image>": 4, "<video>": 8, "<audio>": 12, "<speech>": 30}
    assert counts == {ph: model.num_media_tokens(ph) for ph in model.supported_placeholders}
    specs, model_specs = processor.media_specs(), model.processor.media_specs()
    for placeholder, spec in specs.items():
        want = model_specs[placeholder]
        assert (spec.field, spec.token_id, spec.num_tokens, spec.max_seconds) == (
            want.field, want.token_id, want.num_tokens, want.max_seconds)
        path = saved["media"][spec.field]
        got, expected = spec.load_item(path, "r1"), want.load_item(path, "r1")
        if spec.field != "image":   # (parts, ...): frames, windows, chunks
            assert got.shape[0] == processor.num_parts(placeholder)
        assert torch.equal(got, expected), placeholder
        assert torch.equal(processor.dummy_media(placeholder), model.processor.dummy_media(placeholder))
    assert specs["<speech>"].max_seconds == 60 and specs["<speech>"].load_item(saved["media"]["speech"], "r").shape == (
        2, 80, 3000)


def test_a_dataset_over_the_processor_is_the_dataset_over_the_model(saved, tmp_path):
    media = saved["media"]
    record = {"id": "all", **media, "conversations": [
        {"from": "human", "value": "<image>\n<video>\n<audio>\n<speech>\nWhat is there?"},
        {"from": "gpt", "value": "a red square and a beep"}]}
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(record) + "\n")
    processor = MediaProcessor.from_pretrained(saved["checkpoint"])
    ours = MultimodalDataset(str(path), processor.tokenizer, processor.media_specs(), progress=False)[0]
    model = saved["model"]
    theirs = MultimodalDataset(str(path), model.tokenizer, model.media_specs(), progress=False)[0]
    assert ours.keys() == theirs.keys()
    for key in ours:
        assert torch.equal(ours[key], theirs[key]), key
    assert int((ours["input_ids"] == processor.placeholder_ids["<speech>"]).sum()) == 30


def test_a_placeholder_without_an_encoder_is_named(saved, tiny_assets):
    processor = MediaProcessor.from_config(config_from_dict({"model": {
        "llm": tiny_assets["llm"], "encoders": {}, "projectors": {}}}).model)
    assert processor.supported_placeholders == [] and processor.media_specs() == {}
    with pytest.raises(ValueError, match="no audio encoder, so it cannot take <audio>"):
        processor.num_media_tokens("<audio>")


def test_mllm_data_check_uses_the_checkpoints_processor(saved, tmp_path, capsys):
    from mllm.cli import main

    media = saved["media"]
    turn = [{"from": "human", "value": "<image>\n<speech>\nWhat is it?"}, {"from": "gpt", "value": "red"}]
    (tmp_path / "noise.wav").write_bytes(b"RIFF not audio")
    records = [{"id": "good", "image": media["image"], "speech": media["speech"], "conversations": turn},
               {"id": "bad", "image": media["image"], "speech": str(tmp_path / "noise.wav"), "conversations": turn}]
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    assert main(["data", "check", str(path), "--checkpoint", saved["checkpoint"], "--decode"]) == 1
    out = capsys.readouterr().out
    assert "1 records loaded" in out and "1  unreadable media file: e.g. " in out and "record 'bad'" in out
    assert f"{saved['checkpoint']}: tokens per media item: <image> 4, <video> 8, <audio> 12, <speech> 30" in out
