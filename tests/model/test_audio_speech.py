"""Audio (BEATs, windowed) and speech (Whisper, window-level Q-Former) through the data
pipeline and the model, next to images."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from mllm.config import config_from_dict
from mllm.data.dataset import MultimodalCollator, MultimodalDataset
from mllm.data.media import load_audio, split_audio_windows, write_audio, write_video
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


def test_dataset_says_once_which_audio_files_it_converts(av_model, tmp_path, caplog):
    """Averaging channels and resampling are said once, when the dataset is built, with counts
    per file (not per load: a file read every epoch, or by several records, counts once)."""
    import logging

    write_audio(tmp_path / "stereo44k.wav", np.stack([_sine(2.0, 440)] * 2, axis=1), 44100)
    write_audio(tmp_path / "talk22k.flac", _sine(3.0, 200), 22050)
    write_audio(tmp_path / "talk16k.flac", _sine(3.0, 200), 16000)
    records = [{"id": f"r{i}", "audio": str(tmp_path / "stereo44k.wav"), "speech": str(tmp_path / speech),
                "conversations": [{"from": "human", "value": "<audio>\n<speech>\nWhat is it?"},
                                  {"from": "gpt", "value": "a beep"}]}
               for i, speech in enumerate(["talk22k.flac", "talk16k.flac", "talk22k.flac"])]
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    with caplog.at_level(logging.INFO):
        dataset = MultimodalDataset(str(path), av_model.tokenizer, av_model.media_specs(), progress=False)
        for _ in range(2):   # two epochs
            samples = [dataset[i] for i in range(len(dataset))]
    said = [r.getMessage() for r in caplog.records if "audio files" in r.getMessage()]
    assert said == [(f"{path}: converting 2 of 3 audio files to mono 16 kHz as they load (1 with several "
                     f"channels, averaged; 2 at other rates, resampled)")]
    assert samples[0]["speech_inputs"].shape == (1, 1, 80, 3000)


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


def test_speech_projector_attends_over_all_positions_padding_included(av_model):
    """Speech is padded with silence to 30 s and, as in the official Whisper and SALMONN, the
    window-level Q-Former sees every one of the 1500 positions: no padding mask is applied."""
    encoder, projector = av_model.encoders["speech"], av_model.projectors["speech"].eval()
    clip = _sine(1.0, 200)
    inputs = av_model.processor.preprocess("<speech>", clip)[None]              # (1 clip, 1 window, 80, 3000)
    mel, frame_mask = encoder.preprocess_with_padding_mask([clip])
    assert torch.equal(inputs[0], mel)
    with torch.no_grad():
        features, position_mask = encoder.forward_with_padding_mask(mel, frame_mask)
        assert int((~position_mask).sum()) == 50                            # 1 s of 30 s holds audio
        unmasked = projector(features)
        torch.testing.assert_close(av_model.encode_media("<speech>", inputs), unmasked, rtol=0, atol=0)
        # Masking the padding (HF convention: True = attend) would have given other tokens.
        attend = ~position_mask
        attend[:, ::projector.config.window_size] = True   # no window without a position to attend to
        assert not torch.allclose(projector(features, attend), unmasked)


# ----------------------------------------------------------------- long speech in 30 s chunks

def _speech_like(seconds, seed):
    """Noise shaped differently in every second, so no two 30 s chunks look alike."""
    rng = np.random.default_rng(seed)
    gains = np.repeat(rng.uniform(0.05, 0.5, int(np.ceil(seconds))), 16000)[: int(seconds * 16000)]
    return (gains * rng.standard_normal(gains.size)).astype(np.float32)


@pytest.fixture(scope="module")
def long_speech_model(audio_model_section):
    """Speech up to 90 s: three 30 s chunks of 15 tokens each (windows of 100 positions)."""
    section = {**audio_model_section, "encoders": {**audio_model_section["encoders"]}}
    section["encoders"]["speech"] = dict(section["encoders"]["speech"], max_seconds=90)
    torch.manual_seed(0)
    return MultimodalLM.from_config(config_from_dict({"model": section}).model).eval()


def test_70_s_of_speech_is_three_chunks_each_equal_to_encoding_that_chunk_alone(long_speech_model):
    import whisper

    model = long_speech_model
    encoder, projector = model.encoders["speech"], model.projectors["speech"]
    assert model.num_media_tokens("<speech>") == 3 * 15
    clip = _speech_like(70, seed=0)
    inputs = model.processor.preprocess("<speech>", clip)[None]
    assert inputs.shape == (1, 3, 80, 3000)                                  # one clip, three chunks
    with torch.no_grad():
        features = model.encode_media("<speech>", inputs)
        assert features.shape[:2] == (1, 45)
        for k in range(3):
            alone = clip[k * 480000:(k + 1) * 480000]                        # the last one is 10 s
            assert alone.size == (480000 if k < 2 else 160000)
            # Whisper's own front end pads the short last chunk with silence to 30 s, as we do.
            packaged = whisper.log_mel_spectrogram(whisper.pad_or_trim(torch.from_numpy(alone)))
            torch.testing.assert_close(inputs[0, k], packaged, rtol=0, atol=0)
            expected = projector(encoder(encoder.preprocess([alone])))      # (1, 15, llm_hidden)
            torch.testing.assert_close(features[:, 15 * k:15 * (k + 1)], expected, rtol=1e-5, atol=1e-6)
        # Tokens are in chunk order: swapping two chunks swaps their tokens.
        swapped = model.encode_media("<speech>", inputs[:, [1, 0, 2]])
        torch.testing.assert_close(swapped[:, :15], features[:, 15:30], rtol=1e-5, atol=1e-6)


def test_long_speech_through_dataset_collator_cache_and_generation(long_speech_model, tmp_path, caplog):
    """The 45-token count is the same in tokenisation, collation, splicing, the feature cache and
    generation; a clip past max_seconds is trimmed with a counted warning."""
    import dataclasses
    import glob
    import logging

    from mllm.encoders.cache import FeatureCache

    model = long_speech_model
    records = []
    for name, seconds in (("long", 70), ("short", 5), ("too_long", 100)):
        write_audio(tmp_path / f"{name}.flac", _speech_like(seconds, seed=seconds), 16000)
        records.append({"id": name, "speech": str(tmp_path / f"{name}.flac"),
                        "conversations": [{"from": "human", "value": "<speech>\nTranscribe the speech."},
                                          {"from": "gpt", "value": "one two"}]})
    path = tmp_path / "speech.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    with caplog.at_level(logging.INFO):
        dataset = MultimodalDataset(str(path), model.tokenizer, model.media_specs(), progress=False)
    trimmed = [r for r in caplog.records if "run past" in r.getMessage()]
    assert len(trimmed) == 1 and trimmed[0].levelno == logging.WARNING
    assert "1 speech clip(s) run past 90 s (the longest 100.0 s)" in trimmed[0].getMessage()
    assert str(path) in trimmed[0].getMessage()
    assert dataset.audio_conversions.trimmed == {"speech": 1}

    speech_id = model.placeholder_ids["<speech>"]
    samples = [dataset[i] for i in range(3)]
    assert all(int((s["input_ids"] == speech_id).sum()) == 45 for s in samples)
    assert all(s["speech_inputs"].shape == (1, 3, 80, 3000) for s in samples)
    # The 5 s clip: its second and third chunks are silence; the 100 s clip ends at 90 s.
    silence = model.encoders["speech"].preprocess([np.zeros(16000, np.float32)])[0]
    assert torch.equal(samples[1]["speech_inputs"][0, 2], silence)
    too_long = model.processor.preprocess("<speech>", load_audio(tmp_path / "too_long.flac")[:90 * 16000])
    assert torch.equal(samples[2]["speech_inputs"][0], too_long)

    batch = MultimodalCollator(model.tokenizer.pad_token_id)(samples)
    assert batch["speech_inputs"].shape == (3, 3, 80, 3000)
    with torch.no_grad():
        assert torch.isfinite(model(**batch).loss)
        # Cached features (one entry per distinct chunk; the silent chunk is shared) splice alike.
        cache_dir = tmp_path / "cache"
        model.feature_caches["speech"] = FeatureCache(str(cache_dir), model.encoders["speech"],
                                                      model.config.encoders["speech"])
        try:
            cached = model.encode_media("<speech>", batch["speech_inputs"])
            again = model.encode_media("<speech>", batch["speech_inputs"])
        finally:
            del model.feature_caches["speech"]
        assert len(glob.glob(str(cache_dir / "*" / "*.safetensors"))) == 3 + 2 + 3
        torch.testing.assert_close(cached, model.encode_media("<speech>", batch["speech_inputs"]))
        assert torch.equal(cached, again)

    prompts = MultimodalDataset(str(path), model.tokenizer, model.media_specs(), progress=False,
                                for_generation=True)
    left = MultimodalCollator(model.tokenizer.pad_token_id, padding_side="left")([prompts[i] for i in range(3)])
    new_tokens = model.generate(**{k: v for k, v in left.items() if k != "labels"}, max_new_tokens=2,
                                do_sample=False)
    assert new_tokens.shape == (3, 2)
    assert dataclasses.asdict(model.config.encoders["speech"])["max_seconds"] == 90


# ----------------------------------------------------------------- stage 1 and 2 on speech

def _speech_config(tiny_assets, demo_data, whisper_path, output_dir, stage, train, **training):
    """The stage configs of tests/train/test_stages.py plus a Whisper speech encoder and
    SALMONN's window-level Q-Former (1 query per 17 positions -> 88 tokens per 30 s)."""
    from mllm.config import EncoderConfig
    from mllm.projectors import ProjectorConfig
    from tests.train.test_stages import _config

    cfg = _config(tiny_assets, demo_data, output_dir, stage, max_steps=2, per_device_train_batch_size=3, **training)
    cfg.data.train, cfg.data.media_root = str(train), None   # records hold absolute paths
    cfg.model.encoders["speech"] = EncoderConfig(type="whisper", path=str(whisper_path))
    cfg.model.projectors["speech"] = ProjectorConfig(**{**TINY_PROJECTOR, "num_queries": 1, "window_size": 17,
                                                        "window_stride": 17})
    return cfg


@pytest.fixture(scope="module")
def speech_stage_data(demo_data, tmp_path_factory):
    """ASR and QA records of generated speech, each split led by one record with an image and
    a speech clip together; all media paths absolute."""
    from mllm.data.synthetic_speech import write_speech_dataset

    folder = tmp_path_factory.mktemp("speech-stages")
    write_checkpoint(folder / "whisper.pt", n_mels=80, seed=3)
    speech = write_speech_dataset(folder / "data", seed=2, num_pretrain=5, num_instruct=5, num_eval=0)
    caption = json.loads(open(demo_data["pretrain"]).readline())
    image = f"{demo_data['media_root']}/{caption['image']}"
    paths = {"whisper": folder / "whisper.pt"}
    for split in ("pretrain", "instruct"):
        records = [json.loads(line) for line in open(speech[split])]
        for r in records:
            r["speech"] = f"{speech['media_root']}/{r['speech']}"
        question = records[0]["conversations"][0]["value"].split("\n", 1)[1]
        answer = records[0]["conversations"][1]["value"]
        if split == "pretrain":   # caption the image and transcribe the speech
            question = "Describe the image and transcribe the speech."
            answer = f"{caption['conversations'][1]['value']} {answer}"
        both = {"id": f"image-speech-{split}", "image": image, "speech": records[0]["speech"],
                "conversations": [{"from": "human", "value": f"<image>\n<speech>\n{question}"},
                                  {"from": "gpt", "value": answer}]}
        paths[split] = folder / f"{split}.jsonl"
        paths[split].write_text("".join(json.dumps(r) + "\n" for r in [both, *records]))
    return paths


def test_speech_stage1_asr_then_stage2_lora_reloads_with_identical_logits(tiny_assets, demo_data, speech_stage_data,
                                                                           tmp_path):
    from mllm.data.synthetic_speech import ASR_PROMPT
    from mllm.train.stages import build_dataset, run_instruct, run_pretrain

    records = [json.loads(line) for line in open(speech_stage_data["pretrain"])]
    assert records[1]["conversations"][0]["value"] == f"<speech>\n{ASR_PROMPT}"
    assert {"image", "speech"} <= set(records[0])

    # Stage 1 (ASR transcripts + one image-and-speech caption): only the speech and image
    # projectors learn; the LLM and all encoders stay as they were.
    cfg1 = _speech_config(tiny_assets, demo_data, speech_stage_data["whisper"], tmp_path / "stage1", "pretrain",
                          speech_stage_data["pretrain"])
    model = MultimodalLM.from_config(cfg1.model)
    assert model.num_media_tokens("<speech>") == 88
    snapshot = {part: {n: p.detach().clone() for n, p in getattr(model, part).state_dict().items()}
                for part in ("llm", "encoders", "projectors")}
    run_pretrain(cfg1, model)
    for part in ("llm", "encoders"):
        after = getattr(model, part).state_dict()
        assert all(torch.equal(snapshot[part][n], after[n]) for n in after), f"{part} changed in stage 1"
    assert set(model.projectors) == {"visual", "speech"}
    for name in ("speech", "visual"):
        before = {n: p for n, p in snapshot["projectors"].items() if n.startswith(f"{name}.")}
        after = model.projectors.state_dict()
        changed = [n for n in before if not torch.equal(before[n], after[n])]
        assert len(changed) > 0.8 * len(before), name

    # Stage 2 (LoRA, from the stage-1 projectors) on spoken-digit questions; the saved output
    # reloads and gives the very same logits on a batch holding speech alone and with an image.
    cfg2 = _speech_config(tiny_assets, demo_data, speech_stage_data["whisper"], tmp_path / "stage2", "instruct",
                          speech_stage_data["instruct"], pretrained_projectors=str(tmp_path / "stage1"))
    trained = run_instruct(cfg2).eval()
    assert any("lora_" in n for n, p in trained.llm.named_parameters() if p.requires_grad)
    reloaded = MultimodalLM.from_pretrained(str(tmp_path / "stage2"))
    assert reloaded.num_media_tokens("<speech>") == 88 and reloaded.config.encoders["speech"].type == "whisper"
    dataset = build_dataset(cfg2, reloaded, cfg2.data.train, cfg2.data.template)
    batch = MultimodalCollator(reloaded.tokenizer.pad_token_id)([dataset[i] for i in range(3)])
    assert batch["speech_inputs"].shape == (3, 1, 80, 3000) and batch["image_inputs"].shape[0] == 1
    with torch.no_grad():
        live, again = trained(**batch).logits, reloaded(**batch).logits
    assert torch.equal(live, again)


def test_stage1_trains_on_a_long_speech_record_in_two_chunks(tiny_assets, demo_data, speech_stage_data, tmp_path,
                                                             caplog):
    """A 50 s clip with max_seconds 60: two 30 s chunks of 88 tokens in every speech record,
    through stage 1's dataset, collator, model and save; the reloaded model keeps the count."""
    import logging

    from mllm.train.stages import run_pretrain

    write_audio(tmp_path / "long.flac", _speech_like(50, seed=5), 16000)
    with open(speech_stage_data["pretrain"]) as f:
        records = [json.loads(line) for line in f]
    long_record = dict(records[1], id="long-speech", speech=str(tmp_path / "long.flac"))
    train = tmp_path / "pretrain.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in [long_record, *records]))
    cfg = _speech_config(tiny_assets, demo_data, speech_stage_data["whisper"], tmp_path / "out", "pretrain", train)
    cfg.model.encoders["speech"].max_seconds = 60
    model = MultimodalLM.from_config(cfg.model)
    assert model.num_media_tokens("<speech>") == 2 * 88
    before = {n: p.detach().clone() for n, p in model.projectors["speech"].state_dict().items()}
    with caplog.at_level(logging.INFO):
        run_pretrain(cfg, model)
    assert not any("run past" in r.getMessage() for r in caplog.records)   # nothing trimmed
    after = model.projectors["speech"].state_dict()
    assert sum(not torch.equal(before[n], after[n]) for n in before) > 0.8 * len(before)
    reloaded = MultimodalLM.from_pretrained(str(tmp_path / "out"))
    assert reloaded.config.encoders["speech"].max_seconds == 60 and reloaded.num_media_tokens("<speech>") == 176


# ----------------------------------------------------------------- shipped audio recipes

AUDIO_CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                                "configs", "audio")


def test_audio_configs_parse_and_hold_their_recipes():
    """Every YAML under configs/audio parses, its tuner and training sections are valid, and the
    windows are MokA's (MUSIC-AVQA: ten 2 s at -0.5 s + 6 s * i; AVE: ten 1 s back to back) and
    SALMONN's (Whisper large-v3, 1 query per 17 positions -> 88 tokens)."""
    import dataclasses

    from mllm.config import load_config
    from mllm.data.media import AUDIO_SAMPLE_RATE
    from mllm.encoders.beats import num_fbank_frames
    from mllm.projectors import QFormerProjector
    from mllm.train.trainer import MllmTrainingArguments
    from mllm.tuners import build_peft_config

    names = sorted(f for f in os.listdir(AUDIO_CONFIG_DIR) if f.endswith((".yaml", ".yml")))
    assert names == ["ave_moka.yaml", "music_avqa_moka.yaml", "music_avqa_moka_qwen2_5_vl.yaml", "speech_whisper.yaml"]
    configs = {}
    for name in names:
        cfg = configs[name] = load_config(os.path.join(AUDIO_CONFIG_DIR, name))
        assert cfg.model.llm and cfg.data.train and cfg.training["output_dir"]
        build_peft_config(cfg.tuner)
        # bf16 needs a GPU to validate; everything else is checked here.
        MllmTrainingArguments(**{**cfg.training, "bf16": False, "use_cpu": True})

    def tokens(projector_cfg, positions):
        tiny = dataclasses.replace(projector_cfg, hidden_size=8, num_heads=2, intermediate_size=8,
                                   encoder_hidden_size=4, llm_hidden_size=4)
        return QFormerProjector(tiny).num_output_tokens(positions)

    ramp = np.arange(1, 60 * AUDIO_SAMPLE_RATE + 1, dtype=np.float32)   # sample k holds k
    for name, seconds, starts in (("music_avqa_moka.yaml", 2.0, [-0.5 + 6 * i for i in range(10)]),
                                  ("ave_moka.yaml", 1.0, [float(i) for i in range(10)])):
        model = configs[name].model
        audio = model.encoders["audio"]
        assert audio.type == "beats" and model.video_frames == 10 and configs[name].tuner.type == "moka"
        assert audio.num_windows == 10 and audio.window_seconds == seconds
        windows = split_audio_windows(ramp, audio.num_windows, int(audio.window_seconds * AUDIO_SAMPLE_RATE),
                                      int(audio.window_hop_seconds * AUDIO_SAMPLE_RATE),
                                      int(audio.window_offset_seconds * AUDIO_SAMPLE_RATE))
        for window, start in zip(windows, starts):
            first = max(start, 0.0) * AUDIO_SAMPLE_RATE + 1     # first real sample in the window
            assert window[int(-min(start, 0.0) * AUDIO_SAMPLE_RATE)] == first
            assert window.size == seconds * AUDIO_SAMPLE_RATE
        beats_tokens = num_fbank_frames(int(seconds * AUDIO_SAMPLE_RATE)) // 16 * 8      # 96 / 48
        assert tokens(model.projectors["audio"], beats_tokens) == 32
        assert tokens(model.projectors["visual"], 256) == 32
    speech = configs["speech_whisper.yaml"].model
    assert speech.encoders["speech"].type == "whisper" and "large-v3" in speech.encoders["speech"].path
    assert tokens(speech.projectors["speech"], 1500) == 88
    assert configs["speech_whisper.yaml"].tuner.type == "none"
