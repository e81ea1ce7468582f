"""Audio-visual demo data: sounds match their answers, answers are balanced per type."""

from __future__ import annotations

import json
import random
from collections import Counter

import numpy as np
import pytest

from mllm.data.media import load_audio
from mllm.data.synthetic import majority_baseline
from mllm.data.synthetic_av import AV_QUESTION_TYPES, Sound, render_sound, write_av_demo_dataset


def _count_beeps(wave: np.ndarray) -> int:
    envelope = np.abs(wave).reshape(-1, 160).max(axis=1) > 0.5 * np.abs(wave).max()  # 10 ms frames
    return int(np.sum(envelope[1:] & ~envelope[:-1]) + envelope[0])


def _dominant_hz(wave: np.ndarray) -> float:
    spectrum = np.abs(np.fft.rfft(wave))
    return float(np.fft.rfftfreq(len(wave), 1 / 16000)[spectrum.argmax()])


@pytest.mark.parametrize("sound", [Sound(1, "high", "loud"), Sound(2, "low", "quiet"), Sound(3, "high", "quiet")])
def test_rendered_sound_has_its_beeps_pitch_and_loudness(sound):
    wave = render_sound(sound, random.Random(0))
    assert _count_beeps(wave) == sound.beeps
    assert (_dominant_hz(wave) > 800) == (sound.pitch == "high")
    assert (np.abs(wave).max() > 0.4) == (sound.loudness == "loud")


@pytest.fixture(scope="module")
def av_data(tmp_path_factory):
    return write_av_demo_dataset(tmp_path_factory.mktemp("av"), seed=3, num_pretrain=20, num_instruct=80, num_eval=160)


def test_answers_are_balanced_and_need_their_medium(av_data):
    records = [json.loads(line) for line in open(av_data["eval"])]
    by_type = {}
    for r in records:
        by_type.setdefault(r["question_type"], Counter())[r["answer"]] += 1
        assert r["needs"] == AV_QUESTION_TYPES[r["question_type"]][0]
        assert r["conversations"][0]["value"].startswith("<image>\n<audio>\n")
    assert set(by_type) == set(AV_QUESTION_TYPES)
    for qtype, counts in by_type.items():
        assert max(counts.values()) - min(counts.values()) <= 1, qtype
    assert majority_baseline(records) <= 0.5


def test_audio_answers_match_the_written_sounds(av_data):
    for line in open(av_data["eval"]):
        r = json.loads(line)
        wave = load_audio(f"{av_data['media_root']}/{r['audio']}")
        if r["question_type"] == "beeps":
            assert ("one", "two", "three")[_count_beeps(wave) - 1] == r["answer"]
        elif r["question_type"] == "pitch":
            assert ("high" if _dominant_hz(wave) > 800 else "low") == r["answer"]
        elif r["question_type"] == "loudness":
            assert ("loud" if np.abs(wave).max() > 0.4 else "quiet") == r["answer"]


def test_stage1_data_mixes_image_and_sound_captions(av_data):
    records = [json.loads(line) for line in open(av_data["pretrain"])]
    assert sum("audio" in r for r in records) == 10 and sum("image" in r for r in records) == 10
    sound = next(r for r in records if "audio" in r)
    assert sound["conversations"][0]["value"].startswith("<audio>") and "beep" in sound["conversations"][1]["value"]
