"""The generated missing-modality data (``mllm.data.synthetic_missing``) read back by the native
readers, the in-memory image cache and the class-count override of the classification stage."""

from __future__ import annotations

import collections

import numpy as np
import torch

from mllm.classify.datasets import read_split
from mllm.classify.missing import IMAGE_MISSING, TEXT_MISSING
from mllm.classify.train import MissingModalityDataset, build_classifier, load_classify_config
from mllm.data.synthetic_missing import (
    PAIR_SHAPES,
    TASTES,
    pair_classes,
    pair_vocabulary,
    write_food101_pairs,
    write_word_tokenizer,
)


def test_food101_pairs_are_balanced_and_each_class_pairs_a_shape_with_a_taste(tmp_path):
    root = write_food101_pairs(str(tmp_path / "food"), n_train=16, n_val=8, n_test=8, seed=3, image_size=16)
    classes = pair_classes()
    assert len(classes) == len(PAIR_SHAPES) * len(TASTES)
    for split, n in (("train", 16), ("val", 8), ("test", 8)):
        samples = read_split("food101", root, split)
        assert len(samples) == n
        assert collections.Counter(s.label for s in samples) == {c: n // len(classes) for c in range(len(classes))}
        for sample in samples:
            taste, shape = classes[sample.label].split("_")
            words = sample.text.split()
            assert taste in words and not (set(TASTES) - {taste}) & set(words)   # the taste is in the text only
            assert f"/{classes[sample.label]}/" in sample.image and shape not in sample.text
    # val images live in the train folder, as in UPMC-Food101
    assert all("/images/train/" in s.image for s in read_split("food101", root, "val"))
    again = write_food101_pairs(str(tmp_path / "again"), n_train=16, n_val=8, n_test=8, seed=3, image_size=16)
    texts = [s.text for s in read_split("food101", root, "test")]
    assert [s.text for s in read_split("food101", again, "test")] == texts     # reproducible from the seed


def test_image_cache_gives_the_decoded_pixels(tmp_path):
    root = write_food101_pairs(str(tmp_path / "food"), n_train=4, n_val=4, n_test=4, seed=0, image_size=16)
    samples = read_split("food101", root, "train")
    table = np.array([0, TEXT_MISSING, IMAGE_MISSING, 0])
    plain, cached = (MissingModalityDataset(samples, table, 16, "white", cache_images=c) for c in (False, True))
    for _ in range(2):
        for i in range(4):
            assert torch.equal(plain[i]["pixel_values"], cached[i]["pixel_values"])
            assert plain[i]["text"] == cached[i]["text"]
    assert sorted(cached.cache) == [0, 1, 3]          # the missing image is a fill, never cached
    assert plain.cache is None


def test_num_classes_overrides_the_dataset_head_size(tmp_path):
    from mllm.classify.tiny import TinyClipSizes, build_tiny_clip

    tokenizer = write_word_tokenizer(str(tmp_path / "tok"), pair_vocabulary())
    clip = build_tiny_clip(str(tmp_path / "clip"), tokenizer, TinyClipSizes(vision_layers=2, text_layers=2))
    cfg = load_classify_config(None, [f"model.backbone={clip}", "tuner.type=frozen", "data.dataset=food101",
                                      "data.num_classes=4"])
    model = build_classifier(cfg)
    assert model.head.out_features == 4
    assert model.backbone.config.vision_config.hidden_size != model.backbone.config.text_config.hidden_size
    cfg.data.num_classes = None
    assert build_classifier(cfg).head.out_features == 101
