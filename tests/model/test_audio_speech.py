"""Audio (BEATs, windowed) and speech (Whisper, window-level Q-Former) through the data
pipeline and the model, next to images."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from mllm.config import config_from_dict
from mllm.data.dataset import MultimodalCollator, MultimodalDataset
from mllm.data.media import split_audio_windows, write_audio, write_video
from mllm.modality import Modality
from mllm.model import MultimodalLM
from tests.conftest import TINY_PROJECTOR, model_section
from tests.encoders.test_beats import random_model, save_official
from tests.encoders.test_whisper import write_checkpoint


@pytest.fixture(scope="module")
def audio_model_section(tiny_assets, tmp_path_factory):
    folder = tmp_path_factory.mktemp("audio-encoders")
    save_official(folder / "beats.pt", random_model())
    write_checkpoint(folder / "whisper.pt", n_mels=80)
    section = model_section(tiny_assets)
    section["encoders"]["audio"] = {"type": "beats", "path": str(folder / "beats.pt"),
                                    "num_windows": 3, "window_seconds": 1.0}
    section["encoders"]["speech"] = {"type": "whisper", "path": str(folder / "whisper.pt")}
    section["projectors"]["audio"] = dict(TINY_PROJECTOR)
    section["projectors"]["speech"] = dict(TINY_PROJECTOR, num_queries=1, window_size=100, window_stride=100)
    return section


@pytest.fixture
def av_model(audio_model_section):
    torch.manual_seed(0)
    return MultimodalLM.from_config(config_from_dict({"model": audio_model_section}).model)


def test_windows_spread_over_the_clip():
    clip = np.arange(50, dtype=np.float32)
    windows = split_audio_windows(clip, num_windows=3, window_samples=20)
    assert [int(w[0]) for w in windows] == [0, 15, 30] and all(len(w) == 20 for w in windows)
    short = split_audio_windows(np.ones(5, np.float32), num_windows=2, window_samples=8)
    assert all(len(w) == 8 and w[5:].sum() == 0 for w in short)
    with pytest.raises(ValueError, match="window length"):
        split_audio_windows(clip, num_windows=2, window_samples=None)


def test_fixed_window_placement_as_mokas_music_avqa():
    """[t - 0.5 s, t + 1.5 s] for t = 0, 6, ..., 54 s of a 60 s clip (here 1 sample = 0.5 s)."""
    clip = np.arange(1, 121, dtype=np.float32)  # 60 s at 2 samples/s, values 1..120
    windows = split_audio_windows(clip, num_windows=10, window_samples=4, hop_samples=12, offset_samples=-1)
    assert windows[0].tolist() == [0, 1, 2, 3]          # the first half second lies before the clip
    assert windows[1].tolist() == [12, 13, 14, 15]      # [5.5 s, 7.5 s)
    assert windows[9].tolist() == [108, 109, 110, 111]  # [53.5 s, 55.5 s)
    past_end = split_audio_windows(clip[:20], num_windows=3, window_samples=4, hop_samples=12, offset_samples=-1)
    assert past_end[2].tolist() == [0, 0, 0, 0]


def test_token_counts_per_window(av_model):
    # BEATs: 3 windows x 4 queries; Whisper: 1500 positions in windows of 100 -> 15 x 1 query.
    assert av_model.num_media_tokens("<audio>") == 3 * 4
    assert av_model.num_media_tokens("<speech>") == 15
    assert av_model.num_media_tokens("<image>") == 4


def _sine(seconds, hz):
    t = np.arange(int(seconds * 16000)) / 16000
    return (0.3 * np.sin(2 * np.pi * hz * t)).astype(np.float32)


def test_audio_speech_and_image_in_one_record(av_model, demo_data, tmp_path):
    write_audio(tmp_path / "beep.wav", _sine(2.5, 440), 16000)
    write_audio(tmp_path / "talk.flac", _sine(4.0, 200), 16000)
    image = json.loads(open(demo_data["instruct"]).readline())["image"]
    record = {"id": "avs", "image": f"{demo_data['media_root']}/{image}", "audio": str(tmp_path / "beep.wav"),
              "speech": str(tmp_path / "talk.flac"),
              "conversations": [{"from": "human", "value": "<image>\n<audio>\n<speech>\nWhat do you see and hear?"},
                                {"from": "gpt", "value": "a red circle and a beep"}]}
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(record) + "\n")
    dataset = MultimodalDataset(str(path), av_model.tokenizer, av_model.media_specs(), progress=False)
    sample = dataset[0]
    assert sample["audio_inputs"].shape[:2] == (1, 3)          # one clip, three windows
    assert sample["speech_inputs"].shape == (1, 1, 80, 3000)    # one clip, one 30 s window
    batch = MultimodalCollator(av_model.tokenizer.pad_token_id)([sample])
    ids = av_model.modality_ids(batch["input_ids"], batch["attention_mask"])
    assert int((ids == Modality.AUDIO).sum()) == 12 and int((ids == Modality.SPEECH).sum()) == 15
    assert int((ids == Modality.VISUAL).sum()) == 4
    loss = av_model(**batch).loss
    loss.backward()
    for name in ("audio", "speech", "visual"):
        assert av_model.projectors[name].query_tokens.grad is not None


def test_audio_comes_from_the_video_track_when_no_audio_file(av_model, tmp_path):
    from PIL import Image

    frames = [Image.new("RGB", (32, 32), (200, 0, 0))] * 4
    write_video(tmp_path / "clip.mp4", frames, fps=2, audio=_sine(2.0, 440))
    record = {"id": "vid", "video": str(tmp_path / "clip.mp4"),
              "conversations": [{"from": "human", "value": "<video>\n<audio>\nWhat happens?"},
                                {"from": "gpt", "value": "a beep"}]}
    only_sound = dict(record, id="sound", conversations=[{"from": "human", "value": "<audio>\nWhat is it?"},
                                                         {"from": "gpt", "value": "a beep"}])
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(record) + "\n" + json.dumps(only_sound) + "\n")
    dataset = MultimodalDataset(str(path), av_model.tokenizer, av_model.media_specs(), progress=False)
    both, sound = dataset[0], dataset[1]
    assert both["video_inputs"].shape[:2] == (1, 2) and both["audio_inputs"].shape[:2] == (1, 3)
    assert "video_inputs" not in sound and sound["audio_inputs"].shape[:2] == (1, 3)
    # The sound is the video's 440 Hz track, not silence.
    assert float(sound["audio_inputs"].std()) > 0.1
