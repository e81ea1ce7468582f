"""Turn a conversation into token ids, labels and a question mask via the tokenizer's chat template.

The tokenizer's own chat template decides the prompt format, so a model is tuned on exactly the
format it was (or will be) prompted with. Labels are found by character offsets rather than by
hand-written per-family rules: each assistant turn is the text that rendering ``messages[:j+1]``
adds after rendering ``messages[:j]`` with the generation prompt. That span holds the answer and
the template's end-of-turn text (``</s>``, ``<|im_end|>``...), which must be labelled so the model
learns to stop.

Media placeholders (``<image>`` ...) are single added tokens; they pass through unchanged (a later
step expands each into its media positions) and never get a label or a question-mask bit.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from mllm.errors import UserError
from mllm.modality import PLACEHOLDERS

IGNORE_INDEX = -100

#: LLaMA-2-chat: ``<s>[INST] <<SYS>>\n{sys}\n<</SYS>>\n\n{user} [/INST] {assistant} </s><s>[INST] ...``.
#: The system block is optional and is folded into the first user turn, as LLaMA-2-chat does.
#: The format has no separate generation prompt: a prompt ending in `` [/INST]`` is one.
LLAMA2_CHAT_TEMPLATE = (
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{%- set system_text = messages[0]['content'] | trim -%}"
    "{%- set turns = messages[1:] -%}"
    "{%- else -%}"
    "{%- set system_text = '' -%}"
    "{%- set turns = messages -%}"
    "{%- endif -%}"
    "{%- for message in turns -%}"
    "{%- if message['role'] == 'user' -%}"
    "{%- set text = message['content'] | trim -%}"
    "{%- if loop.first and system_text -%}"
    "{%- set text = '<<SYS>>\\n' ~ system_text ~ '\\n<</SYS>>\\n\\n' ~ text -%}"
    "{%- endif -%}"
    "{{- bos_token ~ '[INST] ' ~ text ~ ' [/INST]' -}}"
    "{%- elif message['role'] == 'assistant' -%}"
    "{{- ' ' ~ (message['content'] | trim) ~ ' ' ~ eos_token -}}"
    "{%- else -%}"
    "{{- raise_exception('LLaMA-2 chat only knows an optional leading system message, then user/assistant turns') -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
)

TEMPLATE_CHOICES = ("auto", "llama-2", "plain")

_ROLES = ("user", "assistant")
_PLACEHOLDER_RE = re.compile("|".join(re.escape(p) for p in PLACEHOLDERS))
# Stand-in for a user message when locating where a template puts user text. Plain letters, so
# no template filter (trim, escaping) changes it.
_SENTINEL = "MLLMUSERTEXTSENTINELQZX"


class LabelAlignmentError(UserError):
    """The rendered conversation could not be split cleanly into prompt and answer tokens."""


@dataclass
class TokenizedConversation:
    input_ids: list[int]
    labels: list[int]  # IGNORE_INDEX except assistant tokens
    question_mask: list[bool]  # True on user-turn text, False on placeholders, template and assistant tokens

    def __post_init__(self) -> None:
        if not len(self.input_ids) == len(self.labels) == len(self.question_mask):
            raise ValueError("input_ids, labels and question_mask must have the same length")


Span = tuple[int, int]  # [start, end) character offsets in the rendered text


# --------------------------------------------------------------------------- template choice


def resolve_chat_template(tokenizer, template: str = "auto") -> str | None:
    """The jinja template to render with, or None for LLaVA's 'plain' captioning format.

    'auto' prefers the tokenizer's own template and falls back to LLaMA-2-chat; a string that
    looks like jinja is used as the template itself.
    """
    if not isinstance(template, str):
        raise ValueError(f"template must be a string, got {type(template).__name__}")
    if "{%" in template or "{{" in template:
        return template
    if template == "auto":
        if getattr(tokenizer, "chat_template", None):
            # get_chat_template also picks 'default' when a tokenizer carries several named templates.
            return tokenizer.get_chat_template()
        return LLAMA2_CHAT_TEMPLATE
    if template == "llama-2":
        return LLAMA2_CHAT_TEMPLATE
    if template == "plain":
        return None
    raise ValueError(
        f"unknown chat template {template!r}; expected one of {', '.join(TEMPLATE_CHOICES)} "
        "or a jinja template string (containing '{%' or '{{')"
    )


# --------------------------------------------------------------------------- entry point


def tokenize_conversation(
    tokenizer,
    messages: list[dict],
    template: str = "auto",
    *,
    record_id: str = "?",
    for_generation: bool = False,
    system_prompt: str | None = None,
) -> TokenizedConversation:
    """Tokenize one conversation for training (labels on assistant turns) or for generation.

    ``system_prompt`` becomes a leading system message unless the conversation has its own.
    With ``for_generation`` a trailing assistant turn is dropped and the generation prompt added.
    """
    _require_fast_tokenizer(tokenizer)
    messages = _validated_messages(messages, record_id)
    chat_template = resolve_chat_template(tokenizer, template)
    placeholder_ids = _placeholder_token_ids(tokenizer, messages, record_id)
    if chat_template is None:
        return _tokenize_plain(tokenizer, messages, placeholder_ids, record_id, for_generation)

    if system_prompt is not None and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": system_prompt}, *messages]
    if for_generation and messages[-1]["role"] == "assistant":
        messages = messages[:-1]
    if not for_generation and not any(m["role"] == "assistant" for m in messages):
        raise LabelAlignmentError(
            f"record {record_id}: no assistant turn, so it would train with all labels masked"
        )

    def render(msgs: list[dict], add_generation_prompt: bool = False) -> str:
        return _render(tokenizer, chat_template, msgs, add_generation_prompt, record_id)

    text = render(messages, add_generation_prompt=for_generation)
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    input_ids = list(encoding["input_ids"])
    offsets = [tuple(o) for o in encoding["offset_mapping"]]
    _check_placeholders_survived(text, input_ids, placeholder_ids, record_id)

    labels = [IGNORE_INDEX] * len(input_ids)
    if not for_generation:
        for span in _assistant_spans(render, messages, text, record_id):
            for t in _tokens_inside(offsets, span, record_id):
                if input_ids[t] not in placeholder_ids:
                    labels[t] = input_ids[t]
        if all(label == IGNORE_INDEX for label in labels):
            raise LabelAlignmentError(f"record {record_id}: would train with all labels masked")

    question_mask = [False] * len(input_ids)
    for span in _user_spans(render, messages, text, record_id):
        for t in _tokens_overlapping(offsets, span):
            question_mask[t] = input_ids[t] not in placeholder_ids
    return TokenizedConversation(input_ids, labels, question_mask)


# --------------------------------------------------------------------------- validation


def _require_fast_tokenizer(tokenizer) -> None:
    # Labels come from character offsets, which only the Rust-backed tokenizers report.
    if not getattr(tokenizer, "is_fast", False):
        raise TypeError(
            f"{type(tokenizer).__name__} is a slow (python) tokenizer; tokenize_conversation needs a fast "
            "tokenizer for character offsets (load it with AutoTokenizer.from_pretrained(..., use_fast=True))"
        )


def _validated_messages(messages: Sequence[Mapping], record_id: str) -> list[dict]:
    """Check roles and contents; return plain {'role', 'content'} copies (the caller's stay untouched)."""
    if not isinstance(messages, Sequence) or isinstance(messages, str) or not messages:
        raise ValueError(f"record {record_id}: conversation is empty (or not a list of messages)")
    for k, message in enumerate(messages):
        if not isinstance(message, Mapping) or "role" not in message or "content" not in message:
            raise ValueError(f"record {record_id}: message {k} must be a dict with 'role' and 'content'")
        if not isinstance(message["content"], str):
            raise ValueError(
                f"record {record_id}: message {k} content must be a string, got {type(message['content']).__name__}"
            )
    start = 1 if messages[0]["role"] == "system" else 0
    if start == len(messages):
        raise ValueError(f"record {record_id}: conversation has only a system message")
    for k in range(start, len(messages)):
        expected = _ROLES[(k - start) % 2]
        if messages[k]["role"] != expected:
            raise ValueError(
                f"record {record_id}: message {k} has role {messages[k]['role']!r} but {expected!r} was expected "
                "(roles must alternate user/assistant, starting with user, after an optional system message)"
            )
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def _placeholder_token_ids(tokenizer, messages: list[dict], record_id: str) -> set[int]:
    """Ids of all placeholders the tokenizer knows; every placeholder used must be one added token."""
    added = tokenizer.get_added_vocab()
    for message in messages:
        for placeholder in _PLACEHOLDER_RE.findall(message["content"]):
            if placeholder not in added:
                raise ValueError(
                    f"record {record_id}: placeholder {placeholder} is not a single token of this tokenizer; "
                    f"add it first with tokenizer.add_tokens([{placeholder!r}], special_tokens=True)"
                )
    return {added[p] for p in PLACEHOLDERS if p in added}


def _check_placeholders_survived(text: str, input_ids: list[int], placeholder_ids: set[int], record_id: str) -> None:
    # A template that mangles placeholders would silently detach media from the text.
    expected = len(_PLACEHOLDER_RE.findall(text))
    found = sum(1 for i in input_ids if i in placeholder_ids)
    if expected != found:
        raise LabelAlignmentError(
            f"record {record_id}: rendered text has {expected} media placeholders but {found} placeholder tokens"
        )


# --------------------------------------------------------------------------- spans


def _render(tokenizer, chat_template: str, messages: list[dict], add_generation_prompt: bool, record_id: str) -> str:
    try:
        return tokenizer.apply_chat_template(
            messages,
            chat_template=chat_template,
            tokenize=False,
            add_generation_prompt=add_generation_prompt,
        )
    except Exception as error:  # jinja errors (raise_exception in templates) carry no record context
        raise ValueError(f"record {record_id}: chat template failed to render: {error}") from error


def _assistant_spans(render: Callable, messages: list[dict], text: str, record_id: str) -> list[Span]:
    """[start, end) of each assistant answer plus the end-of-turn text the template adds after it."""
    spans = []
    for j, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start = len(_prefix_of(text, render(messages[:j], add_generation_prompt=True), record_id, j))
        end = len(_prefix_of(text, render(messages[: j + 1]), record_id, j + 1))
        if message["content"].strip() not in text[start:end]:
            raise LabelAlignmentError(
                f"record {record_id}: assistant message {j} does not appear where the template renders "
                "its turn (does the template support add_generation_prompt?)"
            )
        spans.append((start, end))
    return spans


def _prefix_of(text: str, prefix: str, record_id: str, n_messages: int) -> str:
    if not text.startswith(prefix):
        raise LabelAlignmentError(
            f"record {record_id}: rendering the first {n_messages} messages is not a prefix of rendering the "
            "whole conversation, so answer tokens cannot be located (the chat template rewrites earlier turns)"
        )
    return prefix


def _user_spans(render: Callable, messages: list[dict], text: str, record_id: str) -> list[Span]:
    """[start, end) of each user message's text as rendered.

    Rendering the turn with a sentinel as its content shows where the template puts user text even
    when it puts other text in the same turn (LLaMA-2 folds the system prompt into the first one).
    """
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "user":
            continue
        probe = render([*messages[:i], {"role": "user", "content": _SENTINEL}])
        start = probe.find(_SENTINEL)
        if start < 0 or text[:start] != probe[:start]:
            raise LabelAlignmentError(f"record {record_id}: cannot locate user message {i} in the rendered text")
        content = message["content"]
        # Templates often trim message text, so accept the trimmed forms as well.
        for candidate in (content, content.strip(), content.lstrip(), content.rstrip()):
            if text.startswith(candidate, start):
                spans.append((start, start + len(candidate)))
                break
        else:
            raise LabelAlignmentError(
                f"record {record_id}: the chat template changes the text of user message {i}"
            )
    return spans


def _tokens_inside(offsets: list[Span], span: Span, record_id: str) -> list[int]:
    """Tokens lying within ``span``; a token reaching across its boundary is an error."""
    lo, hi = span
    inside = []
    for t, (start, end) in enumerate(offsets):
        if start == end:  # zero-width token: belongs where it sits
            if lo <= start < hi:
                inside.append(t)
        elif lo <= start and end <= hi:
            inside.append(t)
        elif start < hi and end > lo:
            raise LabelAlignmentError(
                f"record {record_id}: token {t} (chars {start}-{end}) straddles the answer boundary "
                f"({lo}-{hi}); the template glues the answer to neighbouring text"
            )
    return inside


def _tokens_overlapping(offsets: list[Span], span: Span) -> list[int]:
    # Lenient on purpose: a token like " What" in "[INST] What" carries template space and user text.
    lo, hi = span
    return [t for t, (start, end) in enumerate(offsets) if start < hi and end > lo]


# --------------------------------------------------------------------------- plain captioning


def _tokenize_plain(
    tokenizer, messages: list[dict], placeholder_ids: set[int], record_id: str, for_generation: bool
) -> TokenizedConversation:
    """LLaVA's stage-1 'plain' format: [bos] placeholders caption eos, labels on caption + eos.

    The first user turn contributes only its placeholders; its text (an instruction) is dropped.
    bos is kept when the tokenizer has one, as decoder LMs always see it first in pretraining.
    """
    turns = [m for m in messages if m["role"] != "system"]
    added = tokenizer.get_added_vocab()
    prompt = [added[p] for p in _PLACEHOLDER_RE.findall(turns[0]["content"])]
    if tokenizer.bos_token_id is not None:
        prompt.insert(0, tokenizer.bos_token_id)
    if for_generation:
        return TokenizedConversation(prompt, [IGNORE_INDEX] * len(prompt), [False] * len(prompt))

    if len(turns) < 2:
        raise LabelAlignmentError(f"record {record_id}: no assistant turn, so it would train with all labels masked")
    if tokenizer.eos_token_id is None:
        raise ValueError("the 'plain' template needs a tokenizer with an eos token")
    caption = tokenizer(turns[1]["content"], add_special_tokens=False)["input_ids"]
    answer = [*caption, tokenizer.eos_token_id]
    input_ids = prompt + answer
    labels = [IGNORE_INDEX] * len(prompt) + [IGNORE_INDEX if i in placeholder_ids else i for i in answer]
    return TokenizedConversation(input_ids, labels, [False] * len(input_ids))
