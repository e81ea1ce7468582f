"""Generated image-text classification data for the missing-modality demos and tests, written in
the benchmarks' native layouts so that the real readers load it:

* ``write_hateful_memes``  - Hateful Memes (``{train,dev,test}.jsonl`` + ``img/``), binary;
* ``write_food101_pairs``  - UPMC-Food101 (``class_idx.json``, ``text.json``, ``split.json``,
  ``images/{train,test}/<class>/<class>_<n>.jpg``); the class is a (shape, taste) pair: the shape
  is only in the image, the taste only in the text, so a class needs both modalities;
* ``write_cmml_tasks``     - RebQ's CMML layout (``<Name>.json`` items with ``task_id``, ``split``,
  ``image``, ``text``, ``label`` + ``images/``): a sequence of tasks, each its own image style and
  vocabulary, whose classes again pair an image attribute with a text attribute.

Plus ``write_word_tokenizer``: a word-level tokenizer over the generated vocabulary (no downloads).
Images reuse the demo's shape renderer (``mllm.data.synthetic``). In the Food101-format data
colour and background vary at random and carry no label information; each CMML task has its own
colours (what tells the tasks apart, not the classes within a task).
"""

from __future__ import annotations

import json
import os
import random
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw

from mllm.data.synthetic import BACKGROUNDS, COLORS, _draw_shape

# -- vocabulary ---------------------------------------------------------------------------------------
#: Hateful-Memes-style generator words (the first is the signal word).
MEME_WORDS = ("red", "blue", "green", "cat", "dog", "sun", "moon", "tree", "car", "house", "fish", "bird")
#: The text attribute of ``write_food101_pairs``; exactly one appears in each title.
TASTES = ("sweet", "spicy")
#: The image attribute of ``write_food101_pairs`` (shapes the renderer draws).
PAIR_SHAPES = ("circle", "square")
#: Label-free filler words of the generated titles.
FILLER = ("a", "the", "plate", "bowl", "of", "with", "fresh", "warm", "home", "made", "dish", "soup", "cake",
          "rice", "bread", "pie", "served", "cold", "small", "big", "family", "style", "crispy", "soft")
#: CMML tasks: per task, the text attribute words (one per text class), filler words of the task's
#: own topic and the image background: tasks differ in both modalities (as new domains would).
CMML_TASK_WORDS = (("hot", "cold"), ("wet", "dry"), ("old", "new"), ("fast", "slow"), ("loud", "quiet"),
                   ("light", "heavy"), ("high", "low"), ("rich", "poor"), ("near", "far"), ("soft", "hard"))
CMML_TASK_FILLER = (("soup", "pan", "stove", "kitchen", "spoon"), ("rain", "cloud", "storm", "river", "sea"),
                    ("car", "road", "wheel", "engine", "garage"), ("horse", "race", "track", "rider", "field"),
                    ("music", "band", "drum", "song", "stage"), ("box", "bag", "truck", "load", "crate"),
                    ("hill", "peak", "valley", "cliff", "tower"), ("bank", "coin", "gold", "market", "trade"),
                    ("town", "map", "street", "station", "bridge"), ("bed", "pillow", "chair", "stone", "wood"))
#: per task: (background, shape colour)
CMML_TASK_COLORS = (((0, 0, 0), (220, 40, 40)), ((200, 200, 200), (40, 70, 230)), ((0, 90, 0), (230, 210, 40)),
                    ((0, 0, 120), (230, 230, 230)), ((120, 0, 0), (40, 190, 40)), ((200, 200, 40), (120, 40, 160)),
                    ((0, 120, 120), (240, 140, 20)), ((120, 0, 120), (40, 220, 220)), ((80, 50, 20), (240, 150, 190)),
                    ((255, 255, 255), (20, 20, 20)))
CMML_FILLER = ("a", "the", "is", "very")


def pair_vocabulary() -> list[str]:
    return sorted(set(TASTES) | set(FILLER))


def cmml_vocabulary(num_tasks: int) -> list[str]:
    return sorted({w for t in range(num_tasks) for w in (*CMML_TASK_WORDS[t], *CMML_TASK_FILLER[t])}
                  | set(CMML_FILLER))


def write_word_tokenizer(path: str, words: Sequence[str]) -> str:
    """A word-level fast tokenizer: [PAD] 0, [UNK] 1, the words, then [EOS] (the highest id, which
    CLIP's legacy pooling rule picks when ``eos_token_id`` is 2). Each text gets [EOS] appended."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"[PAD]": 0, "[UNK]": 1, **{w: i + 2 for i, w in enumerate(dict.fromkeys(words))}}
    vocab["[EOS]"] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A [EOS]", special_tokens=[("[EOS]", vocab["[EOS]"])])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", eos_token="[EOS]")
    fast.save_pretrained(path)
    return path


# -- Hateful Memes ------------------------------------------------------------------------------------
def write_hateful_memes(root: str, n_train: int = 48, n_eval: int = 24, seed: int = 0) -> str:
    """Label 1 iff the text says 'red' and the image is bright: both modalities carry signal."""
    rng = np.random.default_rng(seed)
    os.makedirs(os.path.join(root, "img"), exist_ok=True)
    for split, n in (("train", n_train), ("dev", n_eval), ("test", n_eval)):
        with open(os.path.join(root, f"{split}.jsonl"), "w") as f:
            for i in range(n):
                label = int(i % 2)
                words = list(rng.choice(MEME_WORDS[1:], 3)) + (["red"] if label else [])
                shade = 200 if label else 40
                pixels = np.clip(rng.normal(shade, 30, (16, 16, 3)), 0, 255).astype(np.uint8)
                name = f"img/{split}_{i:03d}.png"
                Image.fromarray(pixels).save(os.path.join(root, name))
                f.write(json.dumps({"id": i, "img": name, "label": label, "text": " ".join(words)}) + "\n")
    return root


# -- UPMC-Food101 layout: (shape, taste) classes ------------------------------------------------------
def _title(rng: random.Random, key: str, filler: Sequence[str], length: int) -> str:
    words = [rng.choice(filler) for _ in range(length - 1)]
    words.insert(rng.randrange(length), key)
    return " ".join(words)


def draw_shape_image(rng: random.Random, shape: str, size: int, background=None, color=None,
                     jitter: float = 0.05) -> Image.Image:
    """One large ``shape`` at the centre (moved and shrunk by up to ``jitter`` x size), in a random
    (or the given) colour, on a random (or the given) background. Only the shape carries the label:
    the square is drawn with about the circle's area (``_draw_shape``)."""
    if background is None:
        background = BACKGROUNDS[rng.choice(tuple(BACKGROUNDS))]
    image = Image.new("RGB", (size, size), tuple(max(0, min(255, v + rng.randint(-8, 8))) for v in background))
    radius = size * (0.4 - rng.uniform(0, jitter))
    cx, cy = (size / 2 + size * rng.uniform(-jitter, jitter) for _ in range(2))
    if color is None:
        color = COLORS[rng.choice(tuple(COLORS))]
    color = tuple(max(0, min(255, v + rng.randint(-20, 20))) for v in color)
    _draw_shape(ImageDraw.Draw(image), shape, cx, cy, radius, color)
    return image


def pair_classes() -> list[str]:
    return [f"{taste}_{shape}" for shape in PAIR_SHAPES for taste in TASTES]


def write_food101_pairs(root: str, n_train: int = 400, n_val: int = 100, n_test: int = 200, seed: int = 0,
                        image_size: int = 32, title_length: int = 6) -> str:
    """UPMC-Food101-format data with ``len(PAIR_SHAPES) * len(TASTES)`` balanced classes.

    A class is ``<taste>_<shape>``: the shape is drawn in the image (random colour and background,
    small random offset and size), the taste is one word of the title (random filler around it). With one modality
    missing only the other attribute is known, so at most half of the classes can be told apart."""
    rng = random.Random(seed)
    classes = pair_classes()
    os.makedirs(root, exist_ok=True)
    with open(os.path.join(root, "class_idx.json"), "w") as f:
        json.dump({c: i for i, c in enumerate(classes)}, f, indent=1)
    titles, splits, counter = {}, {}, {c: 0 for c in classes}
    for split, n in (("train", n_train), ("val", n_val), ("test", n_test)):
        folder = "test" if split == "test" else "train"   # val images live in the train folder (MMP)
        names = []
        for i in range(n):
            cls = classes[i % len(classes)]
            taste, shape = cls.split("_")
            name = f"{cls}_{counter[cls]}.jpg"
            counter[cls] += 1
            directory = os.path.join(root, "images", folder, cls)
            os.makedirs(directory, exist_ok=True)
            draw_shape_image(rng, shape, image_size).save(os.path.join(directory, name), quality=95)
            titles[name] = _title(rng, taste, FILLER, title_length)
            names.append(name)
        rng.shuffle(names)
        splits[split] = names
    with open(os.path.join(root, "text.json"), "w") as f:
        json.dump(titles, f, indent=1)
    with open(os.path.join(root, "split.json"), "w") as f:
        json.dump(splits, f)
    return root


# -- RebQ CMML layout: a sequence of tasks ------------------------------------------------------------
def write_cmml_tasks(root: str, json_name: str, num_tasks: int = 3, n_train: int = 96, n_test: int = 48,
                     seed: int = 0, image_size: int = 32, title_length: int = 5) -> str:
    """Tasks in RebQ's CMML layout, ``2 x 2 = 4`` classes per task (global ids ``4 t + c``).

    Task t draws its images in its own colours (``CMML_TASK_COLORS[t]``) and its titles from its own attribute
    words (``CMML_TASK_WORDS[t]``) and topic words (``CMML_TASK_FILLER[t]``, mixed with a few common
    ones), so tasks are separable from either modality. Within
    a task, class = (shape in {circle, square}) x (which of the task's two words the title holds):
    the image gives one bit, the text the other."""
    if not 1 <= num_tasks <= len(CMML_TASK_WORDS):
        raise ValueError(f"num_tasks must be in 1..{len(CMML_TASK_WORDS)}, got {num_tasks}")
    rng = random.Random(seed)
    os.makedirs(os.path.join(root, "images"), exist_ok=True)
    items = []
    for task in range(num_tasks):
        words = CMML_TASK_WORDS[task]
        for split, n in (("train", n_train), ("test", n_test)):
            for i in range(n):
                c = i % 4
                shape, word = PAIR_SHAPES[c // 2], words[c % 2]
                image = draw_shape_image(rng, shape, image_size, *CMML_TASK_COLORS[task])
                name = f"task{task}/{split}_{i:04d}.png"
                os.makedirs(os.path.join(root, "images", f"task{task}"), exist_ok=True)
                image.save(os.path.join(root, "images", name))
                items.append({"task_id": task, "split": split, "image": name, "label": 4 * task + c,
                              "text": _title(rng, word, CMML_FILLER + CMML_TASK_FILLER[task], title_length)})
    with open(os.path.join(root, json_name), "w") as f:
        json.dump(items, f)
    return root
