"""Generated speech: every clip says its transcript (checked by an independent decoder),
QA answers are balanced, files are wav / flac and reproducible from the seed."""

from __future__ import annotations

import filecmp
import json
import random
from collections import Counter

import numpy as np
import pytest

from mllm.data.media import load_audio
from mllm.data.synthetic import majority_baseline
from mllm.data.synthetic_speech import (
    ASR_PROMPT,
    GLIDE,
    SPEECH_QUESTION_TYPES,
    VOCABULARY,
    Utterance,
    render_utterance,
    word_tones,
    write_speech_dataset,
)

FRAME = 160  # 10 ms


def decode(wave: np.ndarray, sample_rate: int = 16000) -> list[str]:
    """Words of a clip: split at pauses, then name each segment by its strongest low (< 1 kHz)
    and high (> 1 kHz) frequency, nearest tone pair in log frequency."""
    frames = np.abs(wave[: len(wave) // FRAME * FRAME]).reshape(-1, FRAME).max(axis=1)
    voiced = frames > 0.25 * frames.max()
    edges = np.flatnonzero(np.diff(np.r_[0, voiced.astype(int), 0])).reshape(-1, 2)
    words = []
    centre = 1 + GLIDE / 2
    for start, stop in edges:
        segment = wave[start * FRAME: stop * FRAME]
        spectrum = np.abs(np.fft.rfft(segment * np.hanning(segment.size)))
        freqs = np.fft.rfftfreq(segment.size, 1 / sample_rate)
        low = freqs[np.argmax(np.where(freqs < 1000, spectrum, 0))]
        high = freqs[np.argmax(np.where(freqs >= 1000, spectrum, 0))]
        distance = {w: abs(np.log(low / (word_tones(w)[0] * centre))) + abs(np.log(high / (word_tones(w)[1] * centre)))
                    for w in VOCABULARY}
        words.append(min(distance, key=distance.get))
    return words


def test_every_word_has_its_own_tone_pair():
    assert len({word_tones(w) for w in VOCABULARY}) == len(VOCABULARY) == 10


@pytest.mark.parametrize("seed", range(5))
def test_rendered_utterance_says_its_words(seed):
    rng = random.Random(seed)
    words = tuple(rng.choice(VOCABULARY) for _ in range(4))
    wave = render_utterance(Utterance(words), random.Random(seed))
    assert wave.dtype == np.float32 and 1.0 < wave.size / 16000 < 2.5
    assert decode(wave) == list(words)
    # Deterministic from the seed; a little noise, so silence is not digital zero.
    assert np.array_equal(wave, render_utterance(Utterance(words), random.Random(seed)))
    assert 0 < float(np.abs(wave[:800]).max()) < 0.02


@pytest.fixture(scope="module")
def speech_data(tmp_path_factory):
    return write_speech_dataset(tmp_path_factory.mktemp("speech"), seed=5, num_pretrain=10, num_instruct=9,
                                num_eval=30)


def _records(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def test_stage1_records_transcribe_their_clips(speech_data):
    records = _records(speech_data["pretrain"])
    assert len(records) == 10
    for r in records:
        assert r["speech"].endswith(".flac") and set(r) == {"id", "speech", "conversations"}
        human, gpt = r["conversations"]
        assert human == {"from": "human", "value": f"<speech>\n{ASR_PROMPT}"} and gpt["from"] == "gpt"
        assert 2 <= len(gpt["value"].split()) <= 4
        assert decode(load_audio(f"{speech_data['media_root']}/{r['speech']}")) == gpt["value"].split()


def test_qa_answers_match_the_clips_and_are_balanced(speech_data):
    records = _records(speech_data["eval"])
    by_type = {}
    for r in records:
        by_type.setdefault(r["question_type"], Counter())[r["answer"]] += 1
        question, answers = SPEECH_QUESTION_TYPES[r["question_type"]]
        assert r["conversations"][0]["value"] == f"<speech>\n{question}" and r["answer"] in answers
        assert r["conversations"][1]["value"] == r["answer"]
        words = decode(load_audio(f"{speech_data['media_root']}/{r['speech']}"))
        assert words == r["transcript"].split()
        spoken = {"count": ("two", "three", "four")[len(words) - 2], "first": words[0], "last": words[-1]}
        assert spoken[r["question_type"]] == r["answer"]
    assert set(by_type) == set(SPEECH_QUESTION_TYPES) and all(sum(c.values()) == 10 for c in by_type.values())
    for counts in by_type.values():
        assert max(counts.values()) - min(counts.values()) <= 1
    assert majority_baseline(records) <= 0.4


def test_wav_output_and_same_seed_same_files(speech_data, tmp_path):
    again = write_speech_dataset(tmp_path / "a", seed=5, num_pretrain=10, num_instruct=9, num_eval=30)
    for split in ("pretrain", "instruct", "eval"):
        with open(again[split]) as a, open(speech_data[split]) as b:
            assert a.read() == b.read()
    first = _records(again["pretrain"])[0]["speech"]
    assert filecmp.cmp(f"{again['media_root']}/{first}", f"{speech_data['media_root']}/{first}", shallow=False)
    wav = write_speech_dataset(tmp_path / "w", seed=5, num_pretrain=2, num_instruct=0, num_eval=0, audio_format="wav")
    record = _records(wav["pretrain"])[0]
    assert record["speech"].endswith(".wav")
    assert decode(load_audio(f"{wav['media_root']}/{record['speech']}")) == record["conversations"][1]["value"].split()
    with pytest.raises(ValueError, match="audio_format"):
        write_speech_dataset(tmp_path / "x", num_pretrain=1, audio_format="mp3")
