"""Generated Hateful-Memes-format data, a tiny CLIP and a word-level tokenizer saved locally."""

from __future__ import annotations

import json
import os

import numpy as np

WORDS = ["red", "blue", "green", "cat", "dog", "sun", "moon", "tree", "car", "house", "fish", "bird"]


def write_tiny_tokenizer(path: str) -> str:
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    # The tiny CLIP config uses eos_token_id=2, for which transformers pools the *highest* token
    # id (CLIP's legacy rule), so [EOS] gets the last id.
    vocab = {"[PAD]": 0, "[UNK]": 1, **{w: i + 2 for i, w in enumerate(WORDS)}}
    vocab["[EOS]"] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A [EOS]", special_tokens=[("[EOS]", vocab["[EOS]"])])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", eos_token="[EOS]")
    fast.save_pretrained(path)
    return path


def write_tiny_clip(path: str, seed: int = 0) -> str:
    from tests.tuners.mora_helpers import tiny_clip

    tiny_clip(seed).save_pretrained(path)
    return path


def write_memes(root: str, n_train=48, n_eval=24, seed=0) -> str:
    """Label 1 iff the text says 'red' and the image is bright: both modalities carry signal."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    os.makedirs(os.path.join(root, "img"), exist_ok=True)
    for split, n in (("train", n_train), ("dev", n_eval), ("test", n_eval)):
        with open(os.path.join(root, f"{split}.jsonl"), "w") as f:
            for i in range(n):
                label = int(i % 2)
                words = list(rng.choice(WORDS[1:], 3)) + (["red"] if label else [])
                shade = 200 if label else 40
                pixels = np.clip(rng.normal(shade, 30, (16, 16, 3)), 0, 255).astype(np.uint8)
                name = f"img/{split}_{i:03d}.png"
                Image.fromarray(pixels).save(os.path.join(root, name))
                f.write(json.dumps({"id": i, "img": name, "label": label, "text": " ".join(words)}) + "\n")
    return root
