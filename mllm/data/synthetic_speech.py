"""Generated "speech" for the speech-text pipeline: spoken digits as tone pairs.

Each word of a ten-word vocabulary ("zero" .. "nine") is a 0.3 s chirp of two simultaneous
tones, one from a low group and one from a high group (like touch-tone dialling), both gliding
up by ``GLIDE`` over the word. An utterance is two to four words with short pauses, a random
"speaker" pitch factor, loudness and a little noise, all drawn from the seed. Clips are written
as FLAC or WAV with ``mllm.data.media.write_audio``.

Records are LLaVA-style with a ``speech`` field:

* stage 1 (ASR style): ``<speech>\\nTranscribe the speech.`` -> ``"three one four"``;
* stage 2 / eval (QA): how many words, the first word, the last word; answers balanced within
  each question type, so only a model that listens beats the majority answer.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass

import numpy as np

from mllm.data.media import AUDIO_SAMPLE_RATE, write_audio

VOCABULARY = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
#: Tone groups (Hz). Word k sounds LOW_TONES[k % 4] together with HIGH_TONES[k // 4].
LOW_TONES = (350.0, 480.0, 640.0, 820.0)
HIGH_TONES = (1250.0, 1650.0, 2150.0)
GLIDE = 0.08                      # both tones rise by 8 % over the word (a chirp)
WORD_SECONDS = 0.3
FADE_SECONDS = 0.015              # raised-cosine ramps at both ends of a word
PAUSE_SECONDS = (0.08, 0.15)      # between words
LEAD_SECONDS = (0.1, 0.3)         # silence before the first word
TAIL_SECONDS = 0.2
SPEAKER_JITTER = 0.03             # the whole utterance is pitched up or down by up to 3 %
NOISE_STD = 0.003
MIN_WORDS, MAX_WORDS = 2, 4
COUNT_WORDS = ("two", "three", "four")     # answers of "How many words are spoken?"

ASR_PROMPT = "Transcribe the speech."
#: question type -> (question, possible answers)
SPEECH_QUESTION_TYPES: dict[str, tuple[str, tuple[str, ...]]] = {
    "count": ("How many words are spoken?", COUNT_WORDS),
    "first": ("What is the first word?", VOCABULARY),
    "last": ("What is the last word?", VOCABULARY),
}
AUDIO_FORMATS = ("flac", "wav")


def word_tones(word: str) -> tuple[float, float]:
    """(low, high) starting frequencies of a word's tone pair, before the speaker factor."""
    k = VOCABULARY.index(word)
    return LOW_TONES[k % len(LOW_TONES)], HIGH_TONES[k // len(LOW_TONES)]


@dataclass(frozen=True)
class Utterance:
    words: tuple[str, ...]

    @property
    def transcript(self) -> str:
        return " ".join(self.words)

    def answer(self, question_type: str) -> str:
        if question_type == "count":
            return COUNT_WORDS[len(self.words) - MIN_WORDS]
        if question_type == "first":
            return self.words[0]
        if question_type == "last":
            return self.words[-1]
        raise ValueError(f"unknown speech question type {question_type!r}; "
                         f"expected one of {sorted(SPEECH_QUESTION_TYPES)}")


def random_utterance(rng: random.Random, num_words: int | None = None) -> Utterance:
    n = num_words or rng.randint(MIN_WORDS, MAX_WORDS)
    if not MIN_WORDS <= n <= MAX_WORDS:
        raise ValueError(f"utterances have {MIN_WORDS} to {MAX_WORDS} words, not {n}")
    return Utterance(tuple(rng.choice(VOCABULARY) for _ in range(n)))


def _chirp(f0: float, seconds: float, sample_rate: int) -> np.ndarray:
    """A sine whose frequency rises linearly from f0 to f0 * (1 + GLIDE)."""
    t = np.arange(round(seconds * sample_rate)) / sample_rate
    phase = 2 * np.pi * (f0 * t + 0.5 * f0 * GLIDE / seconds * t ** 2)
    return np.sin(phase)


def render_word(word: str, speaker: float = 1.0, sample_rate: int = AUDIO_SAMPLE_RATE) -> np.ndarray:
    """One word: its two tones at half amplitude each (peak <= 1), with fades."""
    low, high = word_tones(word)
    wave = 0.5 * (_chirp(low * speaker, WORD_SECONDS, sample_rate) + _chirp(high * speaker, WORD_SECONDS, sample_rate))
    ramp = round(FADE_SECONDS * sample_rate)
    fade = 0.5 - 0.5 * np.cos(np.pi * np.arange(ramp) / ramp)
    wave[:ramp] *= fade
    wave[-ramp:] *= fade[::-1]
    return wave


def render_utterance(utterance: Utterance, rng: random.Random,
                     sample_rate: int = AUDIO_SAMPLE_RATE) -> np.ndarray:
    """The utterance as a float32 mono waveform (about 1-2.2 s), deterministic given ``rng``."""
    speaker = 1.0 + rng.uniform(-SPEAKER_JITTER, SPEAKER_JITTER)
    loudness = rng.uniform(0.3, 0.6)
    pieces = [np.zeros(int(rng.uniform(*LEAD_SECONDS) * sample_rate))]
    for i, word in enumerate(utterance.words):
        if i:
            pieces.append(np.zeros(int(rng.uniform(*PAUSE_SECONDS) * sample_rate)))
        pieces.append(loudness * render_word(word, speaker, sample_rate))
    pieces.append(np.zeros(int(TAIL_SECONDS * sample_rate)))
    wave = np.concatenate(pieces)
    wave += NOISE_STD * np.random.default_rng(rng.getrandbits(32)).standard_normal(wave.size)
    return wave.astype(np.float32)


def _conversation(question: str, answer: str) -> list[dict]:
    return [{"from": "human", "value": f"<speech>\n{question}"}, {"from": "gpt", "value": answer}]


class _SpeechWriter:
    def __init__(self, out_dir: str, audio_format: str):
        if audio_format not in AUDIO_FORMATS:
            raise ValueError(f"audio_format must be one of {AUDIO_FORMATS}, got {audio_format!r}")
        self.out_dir, self.audio_format = out_dir, audio_format
        os.makedirs(os.path.join(out_dir, "speech"), exist_ok=True)

    def write(self, utterance: Utterance, stem: str, rng: random.Random) -> str:
        path = f"speech/{stem}.{self.audio_format}"
        write_audio(os.path.join(self.out_dir, path), render_utterance(utterance, rng))
        return path


def asr_record(record_id: str, speech_path: str, utterance: Utterance) -> dict:
    """Stage-1 record: the transcript of the clip."""
    return {"id": record_id, "speech": speech_path, "conversations": _conversation(ASR_PROMPT, utterance.transcript)}


def _utterance_with(question_type: str, answer: str, rng: random.Random) -> Utterance:
    if question_type == "count":
        return random_utterance(rng, num_words=COUNT_WORDS.index(answer) + MIN_WORDS)
    words = list(random_utterance(rng).words)
    words[0 if question_type == "first" else -1] = answer
    return Utterance(tuple(words))


def _balanced(n: int, rng: random.Random) -> list[tuple[str, str]]:
    """(question type, answer) pairs: types equally often, answers balanced within a type."""
    types = list(SPEECH_QUESTION_TYPES)
    targets = []
    for i in range(n):
        qtype = types[i % len(types)]
        answers = SPEECH_QUESTION_TYPES[qtype][1]
        targets.append((qtype, answers[(i // len(types)) % len(answers)]))
    rng.shuffle(targets)
    return targets


def qa_record(record_id: str, speech_path: str, utterance: Utterance, question_type: str) -> dict:
    """Stage-2 / eval record: one question about the clip, with ``answer`` and ``question_type``."""
    question = SPEECH_QUESTION_TYPES[question_type][0]
    answer = utterance.answer(question_type)
    return {"id": record_id, "speech": speech_path, "conversations": _conversation(question, answer),
            "answer": answer, "question_type": question_type, "transcript": utterance.transcript}


def write_speech_dataset(out_dir, *, seed: int = 0, num_pretrain: int = 600, num_instruct: int = 900,
                         num_eval: int = 150, audio_format: str = "flac") -> dict[str, str]:
    """Write clips and LLaVA-style JSONL files; same keys as ``write_demo_dataset``
    (``pretrain``, ``instruct``, ``eval``, ``media_root``). Media paths are relative to
    ``media_root``. Same seed, same files."""
    out_dir = os.path.abspath(os.fspath(out_dir))
    rng = random.Random(seed)
    clips = _SpeechWriter(out_dir, audio_format)
    pretrain = []
    for i in range(1, num_pretrain + 1):
        utterance, record_id = random_utterance(rng), f"asr-{i:06d}"
        pretrain.append(asr_record(record_id, clips.write(utterance, record_id, rng), utterance))
    splits = {"pretrain": pretrain}
    for split, prefix, n in (("instruct", "sqa", num_instruct), ("eval", "sqaeval", num_eval)):
        records = []
        for i, (qtype, answer) in enumerate(_balanced(n, rng), 1):
            utterance, record_id = _utterance_with(qtype, answer, rng), f"{prefix}-{i:06d}"
            records.append(qa_record(record_id, clips.write(utterance, record_id, rng), utterance, qtype))
        splits[split] = records
    paths = {"media_root": out_dir}
    for name, records in splits.items():
        paths[name] = os.path.join(out_dir, f"{name}.jsonl")
        with open(paths[name], "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)
    return paths


__all__ = [
    "ASR_PROMPT",
    "SPEECH_QUESTION_TYPES",
    "VOCABULARY",
    "Utterance",
    "asr_record",
    "qa_record",
    "random_utterance",
    "render_utterance",
    "render_word",
    "word_tones",
    "write_speech_dataset",
]
