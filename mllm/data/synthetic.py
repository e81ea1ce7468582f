"""Synthetic "coloured shapes" data for the embedded demo.

Each image holds one or two coloured shapes, each centred in the left or the
right half. The questions can only be answered by looking at the image, the
answers are one word, and within each question type the answers are balanced,
so a model that ignores the image cannot beat the majority-answer baseline
(see :func:`majority_baseline`).
"""

from __future__ import annotations

import json
import os
import random
from collections import Counter
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping

from PIL import Image, ImageDraw

from mllm.data.media import write_video
from mllm.modality import MEDIA_FIELDS

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 190, 40),
    "blue": (40, 70, 230),
    "yellow": (230, 210, 40),
}
SHAPES = ("circle", "square", "triangle")
POSITIONS = ("left", "right")
BACKGROUNDS: dict[str, tuple[int, int, int]] = {"black": (0, 0, 0), "grey": (110, 110, 110)}
COUNT_WORDS = ("one", "two")

QUESTION_TYPES = ("color", "shape", "count", "position")
#: Every possible answer of each question type.
ANSWERS: dict[str, tuple[str, ...]] = {
    "color": tuple(COLORS),
    "shape": SHAPES,
    "count": COUNT_WORDS,
    "position": POSITIONS,
}
#: Share of each question type in instruct and eval data. Types with many
#: answers get more questions, which keeps the overall majority baseline ~34%.
QUESTION_TYPE_WEIGHTS: dict[str, float] = {
    "color": 0.4,
    "shape": 0.35,
    "count": 0.125,
    "position": 0.125,
}
MULTI_TURN_FRACTION = 0.1
VIDEO_FRAMES = 4
VIDEO_MOTIONS = ("left", "right", "nowhere")

# Small per-image variation, so thousands of distinct images exist (exact repeats are still rejected).
_COLOR_JITTER = 20
_BACKGROUND_JITTER = 8
_MAX_TRIES = 10_000


@dataclass(frozen=True)
class Scene:
    """What an image shows: ``(color, shape, position)`` per shape, left first.

    ``jitter_seed`` drives small size, offset and colour variations in
    :func:`draw_scene`; None draws the plain canonical picture.
    """

    objects: tuple[tuple[str, str, str], ...]
    background: str = "black"
    jitter_seed: int | None = None

    def __post_init__(self):
        objects = tuple(sorted(map(tuple, self.objects), key=lambda o: POSITIONS.index(o[2])))
        if not 1 <= len(objects) <= 2:
            raise ValueError(f"a scene holds one or two shapes, got {len(objects)}")
        if len({o[2] for o in objects}) != len(objects):
            raise ValueError("two shapes cannot share one half of the image")
        for color, shape, _ in objects:
            if color not in COLORS or shape not in SHAPES:
                raise ValueError(f"unknown shape {color!r} {shape!r}")
        if self.background not in BACKGROUNDS:
            raise ValueError(f"unknown background {self.background!r}")
        object.__setattr__(self, "objects", objects)

    def at(self, position: str) -> tuple[str, str, str] | None:
        """The shape in the given half, or None."""
        return next((o for o in self.objects if o[2] == position), None)


@dataclass(frozen=True)
class QA:
    question: str
    answer: str
    question_type: str


def random_scene(rng: random.Random) -> Scene:
    """One or two shapes (even odds) in distinct halves; never two of one colour and shape."""
    positions = rng.sample(POSITIONS, rng.choice((1, 2)))
    objects = []
    for position in positions:
        color, shape = rng.choice(tuple(COLORS)), rng.choice(SHAPES)
        # Keeps "Where is the red circle?" unambiguous.
        while any(o[:2] == (color, shape) for o in objects):
            color, shape = rng.choice(tuple(COLORS)), rng.choice(SHAPES)
        objects.append((color, shape, position))
    return Scene(tuple(objects), rng.choice(tuple(BACKGROUNDS)), rng.getrandbits(32))


def draw_scene(scene: Scene, size: int = 32) -> Image.Image:
    """Render a scene as a ``size`` x ``size`` RGB image."""
    jitter = random.Random(scene.jitter_seed) if scene.jitter_seed is not None else None
    background = _jittered(BACKGROUNDS[scene.background], jitter, _BACKGROUND_JITTER)
    image = Image.new("RGB", (size, size), background)
    draw = ImageDraw.Draw(image)
    for color, shape, position in scene.objects:
        # Each shape fills most of the width of its half.
        radius = size / 4 * (jitter.uniform(0.65, 0.85) if jitter else 0.75)
        cx = size / 4 + (size / 2 if position == "right" else 0)
        cx += _offset(jitter, size / 4 - radius - 1)
        cy = size / 2 + _offset(jitter, size / 2 - radius - 2)
        _draw_shape(draw, shape, cx, cy, radius, _jittered(COLORS[color], jitter, _COLOR_JITTER))
    return image


def caption(scene: Scene) -> str:
    """E.g. ``"a red circle on the left and a blue square on the right."``"""
    parts = [f"a {color} {shape} on the {position}" for color, shape, position in scene.objects]
    return " and ".join(parts) + "."


def make_questions(scene: Scene, rng: random.Random) -> list[QA]:
    """One question of each type in :data:`QUESTION_TYPES` about the scene, targets picked by ``rng``."""
    side = rng.choice([o[2] for o in scene.objects])
    color, shape, _ = scene.at(side)
    target = rng.choice(scene.objects)
    return [
        QA(f"What color is the shape on the {side}?", color, "color"),
        QA(f"What shape is on the {side}?", shape, "shape"),
        QA("How many shapes are there?", COUNT_WORDS[len(scene.objects) - 1], "count"),
        QA(f"Where is the {target[0]} {target[1]}?", target[2], "position"),
    ]


def majority_baseline(eval_records: Iterable[Mapping]) -> float:
    """Accuracy of always giving the most common answer of each question type.

    For each ``question_type`` the most frequent ``answer`` among the records
    of that type counts as correct; the result is the number of such records
    over all records. This is what a model ignoring the image could score at
    best if it knew the question type.
    """
    by_type: dict[str, Counter] = {}
    for record in eval_records:
        by_type.setdefault(record["question_type"], Counter())[record["answer"]] += 1
    total = sum(sum(c.values()) for c in by_type.values())
    if total == 0:
        raise ValueError("majority_baseline needs at least one record")
    return sum(c.most_common(1)[0][1] for c in by_type.values()) / total


def write_demo_dataset(
    out_dir,
    *,
    seed: int = 0,
    image_size: int = 32,
    num_pretrain: int = 1500,
    num_instruct: int = 3000,
    num_eval: int = 300,
    num_video: int = 0,
) -> dict[str, str]:
    """Write the demo's images and LLaVA-style JSONL files under ``out_dir``.

    Returns the paths ``"pretrain"``, ``"instruct"``, ``"eval"`` (JSONL files)
    and ``"media_root"`` (``out_dir``; media paths in records are relative to
    it). No two images share their pixels, so eval images never appear in
    training. With ``num_video > 0``, instruct data also holds short videos
    of one shape that moves left, right or nowhere. Same seed, same files.
    """
    out_dir = os.path.abspath(os.fspath(out_dir))
    rng = random.Random(seed)
    images = _ImageWriter(out_dir, image_size)

    pretrain = [_caption_record(i, images, rng) for i in range(1, num_pretrain + 1)]
    instruct = _qa_records("qa", num_instruct, images, rng, multi_turn_fraction=MULTI_TURN_FRACTION)
    if num_video > 0:
        instruct += [_video_record(i, out_dir, image_size, rng) for i in range(1, num_video + 1)]
        rng.shuffle(instruct)
    eval_records = _qa_records("eval", num_eval, images, rng, answer_fields=True)

    paths = {"media_root": out_dir}
    for name, records in (("pretrain", pretrain), ("instruct", instruct), ("eval", eval_records)):
        paths[name] = os.path.join(out_dir, f"{name}.jsonl")
        _write_jsonl(paths[name], records)
    return paths


# --- drawing helpers -------------------------------------------------------


def _jittered(rgb, jitter: random.Random | None, amount: int) -> tuple[int, int, int]:
    if jitter is None:
        return tuple(rgb)
    return tuple(min(255, max(0, c + jitter.randint(-amount, amount))) for c in rgb)


def _offset(jitter: random.Random | None, room: float) -> float:
    return jitter.uniform(-room, room) if jitter is not None and room > 0 else 0.0


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, radius: float, fill):
    if shape == "circle":
        draw.ellipse([cx - radius, cy - radius, cx + radius, cy + radius], fill=fill)
    elif shape == "square":
        half = radius * 0.85  # about the circle's area, so size gives nothing away
        draw.rectangle([cx - half, cy - half, cx + half, cy + half], fill=fill)
    elif shape == "triangle":
        corners = [(cx, cy - radius), (cx + radius, cy + radius), (cx - radius, cy + radius)]
        draw.polygon(corners, fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}")


def _video_frames(color: str, shape: str, motion: str, size: int, rng: random.Random):
    """One shape crossing the frame towards ``motion`` (or staying put) over VIDEO_FRAMES frames."""
    background = BACKGROUNDS[rng.choice(tuple(BACKGROUNDS))]
    fill = _jittered(COLORS[color], rng, _COLOR_JITTER)
    start, end = size / 4, 3 * size / 4
    if motion == "left":
        start, end = end, start
    elif motion == "nowhere":
        start = end = rng.choice((start, end))
    frames = []
    for i in range(VIDEO_FRAMES):
        image = Image.new("RGB", (size, size), background)
        cx = start + (end - start) * i / (VIDEO_FRAMES - 1)
        _draw_shape(ImageDraw.Draw(image), shape, cx, size / 2, size * 0.2, fill)
        frames.append(image)
    return frames


# --- dataset helpers -------------------------------------------------------


class _ImageWriter:
    """Draws scenes whose pixels differ from every image written so far, and saves them."""

    def __init__(self, out_dir: str, size: int):
        self.out_dir = out_dir
        self.size = size
        self.seen: set[bytes] = set()
        os.makedirs(os.path.join(out_dir, "images"), exist_ok=True)

    def new_image(self, rng: random.Random, stem: str, pick: Callable[[Scene], object]):
        """Sample scenes until ``pick(scene)`` is not None for unseen pixels.

        Saves the image as ``images/<stem>.png``; returns (scene, relative path, picked).
        """
        for _ in range(_MAX_TRIES):
            scene = random_scene(rng)
            picked = pick(scene)
            if picked is None:
                continue
            image = draw_scene(scene, self.size)
            pixels = image.tobytes()
            if pixels in self.seen:
                continue
            self.seen.add(pixels)
            path = f"images/{stem}.png"
            image.save(os.path.join(self.out_dir, path))
            return scene, path, picked
        raise RuntimeError("could not draw a new scene; try a larger image_size")


def _caption_record(index: int, images: _ImageWriter, rng: random.Random) -> dict:
    record_id = f"cap-{index:06d}"
    scene, path, _ = images.new_image(rng, record_id, lambda scene: True)
    conversation = _conversation("image", [("Describe the image.", caption(scene))])
    return {"id": record_id, "image": path, "conversations": conversation}


def _qa_records(
    prefix: str,
    n: int,
    images: _ImageWriter,
    rng: random.Random,
    *,
    multi_turn_fraction: float = 0.0,
    answer_fields: bool = False,
) -> list[dict]:
    """``n`` single-image QA records with balanced (type, answer) targets.

    A ``multi_turn_fraction`` of them get a second question about the same
    image; ``answer_fields`` adds ``answer`` and ``question_type`` for scoring.
    """
    multi_turn = set(rng.sample(range(n), round(n * multi_turn_fraction)))
    records = []
    for i, (qtype, answer) in enumerate(_balanced_targets(n, rng)):
        record_id = f"{prefix}-{i + 1:06d}"
        scene, path, qa = images.new_image(rng, record_id, _question_picker(qtype, answer, rng))
        turns = [qa]
        if i in multi_turn:
            turns.append(rng.choice([q for q in make_questions(scene, rng) if q.question_type != qtype]))
        conversation = _conversation("image", [(t.question, t.answer) for t in turns])
        record = {"id": record_id, "image": path, "conversations": conversation}
        if answer_fields:
            record.update(answer=qa.answer, question_type=qa.question_type)
        records.append(record)
    return records


def _balanced_targets(n: int, rng: random.Random) -> list[tuple[str, str]]:
    """``n`` (question_type, answer) pairs.

    Types come in QUESTION_TYPE_WEIGHTS shares; within a type every answer
    comes equally often (to within one).
    """
    counts = {t: int(n * w) for t, w in QUESTION_TYPE_WEIGHTS.items()}
    # Hand the rounding leftovers to the types that lost the most to rounding.
    loss = {t: n * w - counts[t] for t, w in QUESTION_TYPE_WEIGHTS.items()}
    by_loss = sorted(loss, key=loss.get, reverse=True)
    for qtype in by_loss[: n - sum(counts.values())]:
        counts[qtype] += 1
    targets = []
    for qtype, count in counts.items():
        answers = list(ANSWERS[qtype])
        rng.shuffle(answers)  # so leftovers do not always favour the same answer
        targets += [(qtype, answers[i % len(answers)]) for i in range(count)]
    rng.shuffle(targets)
    return targets


def _question_picker(qtype: str, answer: str, rng: random.Random) -> Callable[[Scene], QA | None]:
    def pick(scene: Scene) -> QA | None:
        matches = (q for q in make_questions(scene, rng) if q.question_type == qtype and q.answer == answer)
        return next(matches, None)

    return pick


def _video_record(index: int, out_dir: str, size: int, rng: random.Random) -> dict:
    record_id = f"vid-{index:06d}"
    color, shape, motion = rng.choice(tuple(COLORS)), rng.choice(SHAPES), rng.choice(VIDEO_MOTIONS)
    path = f"videos/{record_id}.mp4"
    write_video(os.path.join(out_dir, path), _video_frames(color, shape, motion, size, rng))
    if rng.random() < 0.5:
        turn = ("What color is the shape in the video?", color)
    else:
        turn = ("Which way does the shape move?", motion)
    return {"id": record_id, "video": path, "conversations": _conversation("video", [turn])}


def _conversation(media_field: str, turns: list[tuple[str, str]]) -> list[dict]:
    """LLaVA-style turns; the media placeholder opens the first question."""
    placeholder = MEDIA_FIELDS[media_field]
    conversation = []
    for i, (question, answer) in enumerate(turns):
        value = f"{placeholder}\n{question}" if i == 0 else question
        conversation += [{"from": "human", "value": value}, {"from": "gpt", "value": answer}]
    return conversation


def _write_jsonl(path: str, records: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")
