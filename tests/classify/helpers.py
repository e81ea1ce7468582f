"""Generated Hateful-Memes-format data, a tiny CLIP and a word-level tokenizer saved locally (the
generators live in ``mllm.data.synthetic_missing``; the demo uses them too)."""

from __future__ import annotations

from mllm.data.synthetic_missing import MEME_WORDS, write_hateful_memes, write_word_tokenizer

WORDS = list(MEME_WORDS)


def write_tiny_tokenizer(path: str) -> str:
    # The tiny CLIP config uses eos_token_id=2, for which transformers pools the *highest* token
    # id (CLIP's legacy rule); the tokenizer gives [EOS] the last id.
    return write_word_tokenizer(path, WORDS)


def write_tiny_clip(path: str, seed: int = 0) -> str:
    from tests.tuners.mora_helpers import tiny_clip

    tiny_clip(seed).save_pretrained(path)
    return path


def write_memes(root: str, n_train=48, n_eval=24, seed=0) -> str:
    """Label 1 iff the text says 'red' and the image is bright: both modalities carry signal."""
    return write_hateful_memes(root, n_train=n_train, n_eval=n_eval, seed=seed)
