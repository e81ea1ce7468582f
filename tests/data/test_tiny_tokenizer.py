"""Locally trained tokenizers in the style of real model families (mllm.data.tiny_tokenizer)."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from mllm.data.templates import LLAMA2_CHAT_TEMPLATE, resolve_chat_template, tokenize_conversation
from mllm.data.tiny_tokenizer import build_tiny_tokenizer
from mllm.modality import PLACEHOLDERS

CORPUS = [
    "A photo of a cat sitting on a mat.",
    "What is shown in the image? Describe the picture in detail.",
    "The dog runs across the green field while children play.",
] * 20

STYLES = [None, "llama-2", "llama-3", "qwen2"]

EXPECTED_SPECIALS = {
    None: {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"},
    "llama-2": {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"},
    "llama-3": {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>", "pad_token": "<|finetune_right_pad_id|>"},
    "qwen2": {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"},
}
EXPECTED_EXTRA = {
    None: set(),
    "llama-2": set(),
    "llama-3": {"<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>"},
    "qwen2": {"<|im_start|>"},
}

CONVERSATION = [
    {"role": "user", "content": "<image>\nWhat is shown in the image?"},
    {"role": "assistant", "content": "A cat sitting on a mat."},
]


@pytest.mark.parametrize("style", STYLES)
def test_specials_and_template_per_style(style):
    tokenizer = build_tiny_tokenizer(CORPUS, style=style)

    assert isinstance(tokenizer, PreTrainedTokenizerFast) and tokenizer.is_fast
    assert tokenizer.special_tokens_map == EXPECTED_SPECIALS[style]
    for token in [*EXPECTED_SPECIALS[style].values(), *EXPECTED_EXTRA[style]]:
        # Every control token is one id and decodes back to itself.
        ids = tokenizer.encode(token, add_special_tokens=False)
        assert len(ids) == 1 and tokenizer.decode(ids) == token
    assert EXPECTED_EXTRA[style] <= set(tokenizer.all_special_tokens)
    assert (tokenizer.chat_template is None) == (style is None)
    if style == "llama-2":
        assert tokenizer.chat_template == LLAMA2_CHAT_TEMPLATE


@pytest.mark.parametrize("style", STYLES)
def test_plain_encoding_adds_bos_like_the_family(style):
    tokenizer = build_tiny_tokenizer(CORPUS, style=style)
    ids = tokenizer("a cat")["input_ids"]
    if style == "qwen2":
        assert tokenizer.bos_token is None and tokenizer.decode(ids) == "a cat"
    else:
        assert ids[0] == tokenizer.bos_token_id and tokenizer.decode(ids[1:]) == "a cat"


def test_chat_layouts():
    llama3 = build_tiny_tokenizer(CORPUS, style="llama-3")
    assert llama3.apply_chat_template(CONVERSATION[:1], tokenize=False, add_generation_prompt=True) == (
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n<image>\nWhat is shown in the image?"
        "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    qwen2 = build_tiny_tokenizer(CORPUS, style="qwen2")
    assert qwen2.apply_chat_template(CONVERSATION, tokenize=False) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n<image>\nWhat is shown in the image?<|im_end|>\n"
        "<|im_start|>assistant\nA cat sitting on a mat.<|im_end|>\n"
    )
    with_system = [{"role": "system", "content": "Be brief."}, *CONVERSATION[:1]]
    assert qwen2.apply_chat_template(with_system, tokenize=False).startswith(
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n"
    )


def test_byte_level_round_trip_of_any_text():
    tokenizer = build_tiny_tokenizer(CORPUS)
    text = "Ünïcödé, emoji 🐈 and\ttabs\n  spaces"
    assert tokenizer.decode(tokenizer.encode(text, add_special_tokens=False)) == text


def test_vocab_size_is_an_upper_bound():
    tokenizer = build_tiny_tokenizer(CORPUS * 5, vocab_size=300)
    assert len(tokenizer) <= 300
    with pytest.raises(ValueError, match="vocab_size"):
        build_tiny_tokenizer(CORPUS, vocab_size=200)


def test_unknown_style():
    with pytest.raises(ValueError, match="llama-3"):
        build_tiny_tokenizer(CORPUS, style="mistral")


@pytest.mark.parametrize("style", STYLES)
def test_save_and_reload_keeps_template_and_specials(style, tmp_path):
    tokenizer = build_tiny_tokenizer(CORPUS, style=style)
    tokenizer.add_tokens(list(PLACEHOLDERS), special_tokens=True)
    tokenizer.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)

    assert reloaded.is_fast
    assert reloaded.chat_template == tokenizer.chat_template
    assert reloaded.special_tokens_map == tokenizer.special_tokens_map
    assert set(reloaded.all_special_tokens) == set(tokenizer.all_special_tokens)
    assert reloaded.get_added_vocab() == tokenizer.get_added_vocab()
    text = "<image> A photo of a dog.</s><|im_end|>"
    assert reloaded(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert resolve_chat_template(reloaded) == resolve_chat_template(tokenizer)
    assert tokenize_conversation(reloaded, CONVERSATION) == tokenize_conversation(tokenizer, CONVERSATION)
