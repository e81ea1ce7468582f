"""Tiny tokenizers built locally in the style of real model families.

Tests and the offline demo cannot download tokenizers, so this trains a small byte-level BPE on a
given corpus and dresses it with the special tokens and chat template of a model family, which
is what the data pipeline actually depends on.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from mllm.data.templates import LLAMA2_CHAT_TEMPLATE

#: LLaMA-3-instruct layout: bos once, then a header and an ``<|eot_id|>`` around every message.
LLAMA3_CHAT_TEMPLATE = (
    "{{- bos_token -}}"
    "{%- for message in messages -%}"
    "{{- '<|start_header_id|>' ~ message['role'] ~ '<|end_header_id|>\\n\\n' -}}"
    "{{- (message['content'] | trim) ~ '<|eot_id|>' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}"
    "{%- endif -%}"
)

#: Qwen2 ChatML layout, with Qwen2's default system message when the conversation has none.
QWEN2_CHAT_TEMPLATE = (
    "{%- if not messages or messages[0]['role'] != 'system' -%}"
    "{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' ~ message['role'] ~ '\\n' ~ message['content'] ~ '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- '<|im_start|>assistant\\n' -}}"
    "{%- endif -%}"
)


@dataclass(frozen=True)
class _Style:
    named: dict[str, str]  # transformers attribute ('bos_token', ...) -> token text
    extra: tuple[str, ...]  # further control tokens the template writes
    chat_template: str | None
    add_bos: bool  # whether plain tokenizer(text) prepends bos, as the family's tokenizer does


_LLAMA_NAMED = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"}

STYLES: dict[str | None, _Style] = {
    None: _Style(_LLAMA_NAMED, (), None, add_bos=True),
    "llama-2": _Style(_LLAMA_NAMED, (), LLAMA2_CHAT_TEMPLATE, add_bos=True),
    "llama-3": _Style(
        {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>", "pad_token": "<|finetune_right_pad_id|>"},
        ("<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>"),
        LLAMA3_CHAT_TEMPLATE,
        add_bos=True,
    ),
    "qwen2": _Style(
        {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"},
        ("<|im_start|>",),
        QWEN2_CHAT_TEMPLATE,
        add_bos=False,
    ),
}

_BYTE_ALPHABET = pre_tokenizers.ByteLevel.alphabet()


def build_tiny_tokenizer(
    corpus: Iterable[str], style: str | None = None, vocab_size: int = 512
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on ``corpus`` and wrap it with the specials/template of ``style``.

    style: None (LLaMA specials, no chat template), 'llama-2', 'llama-3' or 'qwen2'.
    """
    if style not in STYLES:
        raise ValueError(f"unknown tokenizer style {style!r}; expected one of {list(STYLES)}")
    spec = STYLES[style]
    specials = [*spec.named.values(), *spec.extra]
    if vocab_size <= len(_BYTE_ALPHABET) + len(specials):
        raise ValueError(
            f"vocab_size {vocab_size} leaves no room for merges: the byte alphabet and special tokens "
            f"already take {len(_BYTE_ALPHABET) + len(specials)}"
        )
    backend = _train_byte_level_bpe(corpus, specials, vocab_size)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        chat_template=spec.chat_template,
        add_bos_token=spec.add_bos,
        extra_special_tokens=list(spec.extra),
        # Decoding must give back the exact text, as tests compare decoded labels to answers.
        clean_up_tokenization_spaces=False,
        **spec.named,
    )


def _train_byte_level_bpe(corpus: Iterable[str], specials: list[str], vocab_size: int) -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    # No prefix space: it would be added again after every special token and break offsets.
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=_BYTE_ALPHABET,
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus, trainer=trainer)
    # No ByteLevel post-processor: its offset trimming would cut a token's leading space out of its
    # span. transformers installs the bos-adding post-processor from add_bos_token.
    return tokenizer
