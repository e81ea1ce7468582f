"""mllm.data.synthetic: coloured-shape scenes, questions that need the image, and the demo dataset."""

import json
import os
import random
import re
from collections import Counter

import numpy as np
import pytest

from mllm.data.media import load_image, load_video_frames
from mllm.data.synthetic import (
    ANSWERS,
    BACKGROUNDS,
    COLORS,
    QUESTION_TYPES,
    Scene,
    caption,
    draw_scene,
    majority_baseline,
    make_questions,
    random_scene,
    write_demo_dataset,
)
from mllm.modality import MEDIA_FIELDS

SMALL = dict(num_pretrain=40, num_instruct=300, num_eval=300, num_video=6)


# --- reading answers back from pixels ----------------------------------------

_REFERENCE = {**COLORS, **{f"bg-{name}": rgb for name, rgb in BACKGROUNDS.items()}}
_NAMES = list(_REFERENCE)
_RGB = np.array([_REFERENCE[n] for n in _NAMES], dtype=float)


def half_contents(image, position):
    """(colour, shape) seen in one half of the image, or None when it is empty."""
    pixels = np.asarray(image, dtype=float)
    width = pixels.shape[1]
    half = pixels[:, : width // 2] if position == "left" else pixels[:, width // 2 :]
    labels = ((half[:, :, None, :] - _RGB) ** 2).sum(-1).argmin(-1)
    is_shape = np.isin(labels, [i for i, n in enumerate(_NAMES) if not n.startswith("bg-")])
    if is_shape.sum() < 10:
        return None
    color = _NAMES[Counter(labels[is_shape].tolist()).most_common(1)[0][0]]
    rows, cols = np.nonzero(is_shape)
    fill = is_shape.sum() / ((np.ptp(rows) + 1) * (np.ptp(cols) + 1))
    shape = "square" if fill > 0.9 else "triangle" if fill < 0.66 else "circle"
    return color, shape


def answer_from_pixels(image, question):
    """Answer a demo question by looking at the pixels only."""
    halves = {p: half_contents(image, p) for p in ("left", "right")}
    if m := re.fullmatch(r"What color is the shape on the (left|right)\?", question):
        return halves[m[1]][0]
    if m := re.fullmatch(r"What shape is on the (left|right)\?", question):
        return halves[m[1]][1]
    if question == "How many shapes are there?":
        return {1: "one", 2: "two"}[sum(h is not None for h in halves.values())]
    if m := re.fullmatch(r"Where is the (\w+) (\w+)\?", question):
        return next(p for p, h in halves.items() if h == (m[1], m[2]))
    raise AssertionError(f"unexpected question {question!r}")


# --- scenes and questions ----------------------------------------------------


def test_draw_scene_size_and_empty_half():
    scene = Scene([("red", "circle", "left")], background="grey")
    image = draw_scene(scene, size=32)
    assert image.mode == "RGB" and image.size == (32, 32)
    assert half_contents(image, "left") == ("red", "circle")
    assert half_contents(image, "right") is None
    assert draw_scene(scene, size=64).size == (64, 64)


def test_scene_rules():
    with pytest.raises(ValueError):
        Scene([("red", "circle", "left"), ("blue", "square", "left")])
    with pytest.raises(ValueError):
        Scene([("purple", "circle", "left")])
    # Objects are kept left first whatever order they come in.
    scene = Scene([("blue", "square", "right"), ("red", "circle", "left")])
    assert [o[2] for o in scene.objects] == ["left", "right"]


def test_caption():
    scene = Scene([("blue", "square", "right"), ("red", "circle", "left")])
    assert caption(scene) == "a red circle on the left and a blue square on the right."
    assert caption(Scene([("green", "triangle", "right")])) == "a green triangle on the right."


def test_random_scenes_are_varied_and_unambiguous():
    rng = random.Random(1)
    scenes = [random_scene(rng) for _ in range(400)]
    counts = Counter(len(s.objects) for s in scenes)
    assert 0.4 < counts[1] / 400 < 0.6
    for scene in scenes:
        kinds = [o[:2] for o in scene.objects]
        assert len(set(kinds)) == len(kinds)  # "Where is the red circle?" has one answer
    assert len({draw_scene(s).tobytes() for s in scenes}) == len(scenes)


def test_answers_match_drawn_pixels():
    rng = random.Random(2)
    for _ in range(300):
        scene = random_scene(rng)
        image = draw_scene(scene)
        qas = make_questions(scene, rng)
        assert [qa.question_type for qa in qas] == list(QUESTION_TYPES)
        for qa in qas:
            assert qa.answer in ANSWERS[qa.question_type]
            assert answer_from_pixels(image, qa.question) == qa.answer, (scene, qa)


def test_majority_baseline_definition():
    records = [
        {"question_type": "color", "answer": "red"},
        {"question_type": "color", "answer": "red"},
        {"question_type": "color", "answer": "blue"},
        {"question_type": "count", "answer": "one"},
    ]
    # Most common answer per type: "red" (2 of 3) and "one" (1 of 1).
    assert majority_baseline(records) == pytest.approx(3 / 4)
    with pytest.raises(ValueError):
        majority_baseline([])


# --- the demo dataset --------------------------------------------------------


def read_jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    paths = write_demo_dataset(out, seed=0, **SMALL)
    return paths, {name: read_jsonl(paths[name]) for name in ("pretrain", "instruct", "eval")}


def all_files(root):
    files = {}
    for folder, _, names in os.walk(root):
        for name in names:
            path = os.path.join(folder, name)
            with open(path, "rb") as f:
                files[os.path.relpath(path, root)] = f.read()
    return files


def test_same_seed_same_files(tmp_path):
    kwargs = dict(num_pretrain=20, num_instruct=40, num_eval=20, num_video=3)
    write_demo_dataset(tmp_path / "a", seed=5, **kwargs)
    write_demo_dataset(tmp_path / "b", seed=5, **kwargs)
    write_demo_dataset(tmp_path / "c", seed=6, **kwargs)
    a, b, c = (all_files(tmp_path / d) for d in "abc")
    assert len(a) == 20 + 40 + 20 + 3 + 3
    assert a == b
    assert a != c


def test_returned_paths(dataset):
    paths, _ = dataset
    assert set(paths) == {"pretrain", "instruct", "eval", "media_root"}
    for name in ("pretrain", "instruct", "eval"):
        assert os.path.dirname(paths[name]) == paths["media_root"]


def check_conversation(record, field):
    turns = record["conversations"]
    assert len(turns) % 2 == 0 and turns
    assert [t["from"] for t in turns] == ["human", "gpt"] * (len(turns) // 2)
    placeholder = MEDIA_FIELDS[field]
    assert turns[0]["value"].startswith(placeholder + "\n")
    assert sum(t["value"].count(placeholder) for t in turns) == 1
    for gpt in turns[1::2]:
        assert 1 <= len(gpt["value"].split()) <= 2 or record["id"].startswith("cap-")


def test_record_fields(dataset):
    paths, records = dataset
    root = paths["media_root"]
    assert len(records["pretrain"]) == SMALL["num_pretrain"]
    assert len(records["instruct"]) == SMALL["num_instruct"] + SMALL["num_video"]
    assert len(records["eval"]) == SMALL["num_eval"]
    ids = [r["id"] for split in records.values() for r in split]
    assert len(ids) == len(set(ids))

    for record in records["pretrain"]:
        assert record["id"].startswith("cap-")
        check_conversation(record, "image")
        assert record["conversations"][0]["value"] == "<image>\nDescribe the image."
        assert re.fullmatch(r"a \w+ \w+ on the (left|right)( and a \w+ \w+ on the right)?\.",
                            record["conversations"][1]["value"])
    for record in records["instruct"] + records["eval"]:
        field = "video" if "video" in record else "image"
        assert not os.path.isabs(record[field])
        assert os.path.isfile(os.path.join(root, record[field]))
        check_conversation(record, field)
    for record in records["eval"]:
        assert len(record["conversations"]) == 2
        assert record["conversations"][1]["value"] == record["answer"]
        assert record["answer"] in ANSWERS[record["question_type"]]

    images = [r for r in records["instruct"] if "image" in r]
    multi = sum(len(r["conversations"]) == 4 for r in images)
    assert 0.05 <= multi / len(images) <= 0.2


def test_eval_images_are_held_out(dataset):
    paths, records = dataset
    root = paths["media_root"]

    def pixels(split):
        return {load_image(os.path.join(root, r["image"])).tobytes() for r in records[split] if "image" in r}

    train = pixels("pretrain") | pixels("instruct")
    eval_pixels = pixels("eval")
    assert len(eval_pixels) == len(records["eval"])
    assert not train & eval_pixels


def test_saved_answers_match_saved_pixels(dataset):
    paths, records = dataset
    root = paths["media_root"]
    for record in records["eval"] + [r for r in records["instruct"] if "image" in r][:100]:
        image = load_image(os.path.join(root, record["image"]), record["id"])
        turns = record["conversations"]
        for human, gpt in zip(turns[::2], turns[1::2]):
            question = human["value"].removeprefix("<image>\n")
            assert answer_from_pixels(image, question) == gpt["value"], record


def test_answers_are_balanced(dataset):
    _, records = dataset
    qa_sets = {
        "eval": records["eval"],
        # Instruct records carry no question_type: read it off the first question.
        "instruct": [
            {"question_type": question_type(r["conversations"][0]["value"]), "answer": r["conversations"][1]["value"]}
            for r in records["instruct"]
            if "image" in r
        ],
    }
    for name, qas in qa_sets.items():
        types = Counter(r["question_type"] for r in qas)
        assert set(types) == set(QUESTION_TYPES), name
        for qtype in QUESTION_TYPES:
            answers = Counter(r["answer"] for r in qas if r["question_type"] == qtype)
            assert set(answers) == set(ANSWERS[qtype]), (name, qtype)
            assert max(answers.values()) / types[qtype] <= 0.6, (name, qtype, answers)
        assert majority_baseline(qas) <= 0.4, name


def question_type(question):
    question = question.removeprefix("<image>\n")
    for prefix, qtype in (("What color", "color"), ("What shape", "shape"), ("How many", "count"),
                          ("Where", "position")):
        if question.startswith(prefix):
            return qtype
    raise AssertionError(question)


def test_video_records(dataset):
    paths, records = dataset
    videos = [r for r in records["instruct"] if "video" in r]
    assert len(videos) == SMALL["num_video"]
    for record in videos:
        assert record["id"].startswith("vid-") and "image" not in record
        frames = load_video_frames(os.path.join(paths["media_root"], record["video"]), 4, record["id"])
        assert len(frames) == 4 and frames[0].size == (32, 32)
        question, answer = (t["value"] for t in record["conversations"])
        if "color" in question:
            assert answer in COLORS
            seen = {half_contents(f, p) for f in frames for p in ("left", "right")} - {None}
            assert {color for color, _ in seen} == {answer}
        else:
            assert answer in ("left", "right", "nowhere")


def test_no_video_by_default(tmp_path):
    paths = write_demo_dataset(tmp_path, num_pretrain=5, num_instruct=10, num_eval=5)
    assert not os.path.exists(tmp_path / "videos")
    assert all("video" not in r for r in read_jsonl(paths["instruct"]))
