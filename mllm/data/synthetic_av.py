"""Audio-visual demo data: the coloured shapes of ``mllm.data.synthetic`` paired with beeps.

A sound is one to three beeps, high or low, loud or quiet. Questions need the sound (how many
beeps, pitch, loudness), the image (colour, shape, count, position) or both ("Are there as many
beeps as shapes?"). Within each question type the answers are balanced, so a model that ignores
the medium a question needs cannot beat the majority-answer baseline on it.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass

import numpy as np

from mllm.data.media import AUDIO_SAMPLE_RATE, write_audio
from mllm.data.synthetic import COUNT_WORDS, QA, _caption_record, _ImageWriter, _question_picker

BEEP_COUNTS = ("one", "two", "three")
PITCHES = {"high": 1200.0, "low": 300.0}      # Hz
LOUDNESS = {"loud": 0.8, "quiet": 0.08}       # peak amplitude
CLIP_SECONDS = 2.0

#: question type -> (medium it needs, its answers)
AV_QUESTION_TYPES: dict[str, tuple[str, tuple[str, ...]]] = {
    "color": ("image", ("red", "green", "blue", "yellow")),
    "shape": ("image", ("circle", "square", "triangle")),
    "count": ("image", COUNT_WORDS),
    "position": ("image", ("left", "right")),
    "beeps": ("audio", BEEP_COUNTS),
    "pitch": ("audio", tuple(PITCHES)),
    "loudness": ("audio", tuple(LOUDNESS)),
    "match": ("both", ("yes", "no")),
}
AUDIO_QUESTIONS = {"beeps": "How many beeps are there?", "pitch": "Is the sound high or low?",
                   "loudness": "Is the sound loud or quiet?"}
MATCH_QUESTION = "Are there as many beeps as shapes?"


@dataclass(frozen=True)
class Sound:
    beeps: int        # 1..3
    pitch: str        # high | low
    loudness: str     # loud | quiet

    def answer(self, question_type: str) -> str:
        return {"beeps": BEEP_COUNTS[self.beeps - 1], "pitch": self.pitch, "loudness": self.loudness}[question_type]


def random_sound(rng: random.Random, beeps: int | None = None) -> Sound:
    return Sound(beeps or rng.randint(1, 3), rng.choice(tuple(PITCHES)), rng.choice(tuple(LOUDNESS)))


def render_sound(sound: Sound, rng: random.Random, seconds: float = CLIP_SECONDS,
                 sample_rate: int = AUDIO_SAMPLE_RATE) -> np.ndarray:
    """Beeps of 0.25 s spread evenly over the clip, with a little noise and jitter."""
    t = np.arange(int(seconds * sample_rate)) / sample_rate
    wave = 0.003 * np.random.default_rng(rng.getrandbits(32)).standard_normal(t.size)
    slot = seconds / sound.beeps
    frequency = PITCHES[sound.pitch] * rng.uniform(0.95, 1.05)
    for i in range(sound.beeps):
        start = i * slot + (slot - 0.25) / 2
        on = (t >= start) & (t < start + 0.25)
        wave[on] += LOUDNESS[sound.loudness] * np.sin(2 * np.pi * frequency * t[on])
    return wave.astype(np.float32)


def sound_caption(sound: Sound) -> str:
    count = BEEP_COUNTS[sound.beeps - 1]
    return f"{count} {sound.loudness} {sound.pitch} beep{'s' if sound.beeps > 1 else ''}."


class _SoundWriter:
    def __init__(self, out_dir: str):
        self.out_dir = out_dir
        os.makedirs(os.path.join(out_dir, "sounds"), exist_ok=True)

    def write(self, sound: Sound, stem: str, rng: random.Random) -> str:
        path = f"sounds/{stem}.wav"
        write_audio(os.path.join(self.out_dir, path), render_sound(sound, rng))
        return path


def _balanced(n: int, rng: random.Random) -> list[tuple[str, str]]:
    """(question type, answer) pairs: types equally often, answers balanced within a type."""
    types = list(AV_QUESTION_TYPES)
    targets = []
    for i in range(n):
        qtype = types[i % len(types)]
        answers = AV_QUESTION_TYPES[qtype][1]
        targets.append((qtype, answers[(i // len(types)) % len(answers)]))
    rng.shuffle(targets)
    return targets


def _av_record(record_id: str, qtype: str, answer: str, images: _ImageWriter, sounds: _SoundWriter,
               rng: random.Random) -> dict:
    medium = AV_QUESTION_TYPES[qtype][0]
    if medium == "image":
        scene, image, qa = images.new_image(rng, record_id, _question_picker(qtype, answer, rng))
        sound = random_sound(rng)
    elif medium == "audio":
        scene, image, _ = images.new_image(rng, record_id, lambda s: True)
        sound = random_sound(rng)
        while sound.answer(qtype) != answer:
            sound = random_sound(rng)
        qa = QA(AUDIO_QUESTIONS[qtype], answer, qtype)
    else:  # both: compare the number of beeps with the number of shapes
        scene, image, _ = images.new_image(rng, record_id, lambda s: True)
        shapes = len(scene.objects)
        beeps = shapes if answer == "yes" else rng.choice([b for b in (1, 2, 3) if b != shapes])
        sound = random_sound(rng, beeps=beeps)
        qa = QA(MATCH_QUESTION, answer, qtype)
    audio = sounds.write(sound, record_id, rng)
    return {"id": record_id, "image": image, "audio": audio,
            "conversations": [{"from": "human", "value": f"<image>\n<audio>\n{qa.question}"},
                              {"from": "gpt", "value": qa.answer}],
            "answer": qa.answer, "question_type": qtype, "needs": medium}


def write_av_demo_dataset(out_dir, *, seed: int = 0, image_size: int = 32, num_pretrain: int = 1500,
                          num_instruct: int = 3000, num_eval: int = 400) -> dict[str, str]:
    """Write images, sounds and LLaVA-style JSONL files; same keys as ``write_demo_dataset``.

    Stage-1 data mixes image captions and sound captions (AudioCaps style); instruct and eval
    records carry one image and one sound, and eval records say which medium they need."""
    out_dir = os.path.abspath(os.fspath(out_dir))
    rng = random.Random(seed)
    images, sounds = _ImageWriter(out_dir, image_size), _SoundWriter(out_dir)
    pretrain = []
    for i in range(1, num_pretrain + 1):
        if i % 2:
            pretrain.append(_caption_record(i, images, rng))
        else:
            sound = random_sound(rng)
            record_id = f"snd-{i:06d}"
            pretrain.append({"id": record_id, "audio": sounds.write(sound, record_id, rng), "conversations": [
                {"from": "human", "value": "<audio>\nDescribe the sound."},
                {"from": "gpt", "value": sound_caption(sound)}]})
    splits = {"pretrain": pretrain,
              "instruct": [_av_record(f"avqa-{i:06d}", t, a, images, sounds, rng)
                           for i, (t, a) in enumerate(_balanced(num_instruct, rng), 1)],
              "eval": [_av_record(f"aveval-{i:06d}", t, a, images, sounds, rng)
                       for i, (t, a) in enumerate(_balanced(num_eval, rng), 1)]}
    paths = {"media_root": out_dir}
    for name, records in splits.items():
        paths[name] = os.path.join(out_dir, f"{name}.jsonl")
        with open(paths[name], "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)
    return paths
