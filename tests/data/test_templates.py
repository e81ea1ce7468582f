"""Prompt rendering and label placement through chat templates (mllm.data.templates)."""

from __future__ import annotations

import pytest

from mllm.data.templates import (
    IGNORE_INDEX,
    LLAMA2_CHAT_TEMPLATE,
    LabelAlignmentError,
    TokenizedConversation,
    resolve_chat_template,
    tokenize_conversation,
)
from mllm.data.tiny_tokenizer import build_tiny_tokenizer
from mllm.modality import PLACEHOLDERS

CORPUS = [
    "A photo of a cat sitting on a mat.",
    "What is shown in the image? Describe the picture in detail.",
    "The dog runs across the green field while children play.",
    "Listen to the audio clip and tell me what you hear.",
    "Answer the question briefly. Answers should be short.",
] * 20

CHAT_STYLES = ["llama-2", "llama-3", "qwen2"]

# What each family emits after an answer: it is labelled so the model learns to stop.
END_OF_TURN = {"llama-2": " </s>", "llama-3": "<|eot_id|>", "qwen2": "<|im_end|>\n"}
# LLaMA-2 puts the space after [/INST] inside the assistant span; the others start at the answer.
ANSWER_LEAD = {"llama-2": " ", "llama-3": "", "qwen2": ""}

THREE_ROUNDS = [
    {"role": "user", "content": "<image>\nWhat is shown in the image?"},
    {"role": "assistant", "content": "A cat sitting on a mat."},
    {"role": "user", "content": "What colour is the mat?"},
    {"role": "assistant", "content": "The mat is green."},
    {"role": "user", "content": "Listen to <audio> and describe it."},
    {"role": "assistant", "content": "Children play in a field."},
]
USER_TEXTS = ["What is shown in the image?", "What colour is the mat?", "Listen to  and describe it."]
ANSWERS = ["A cat sitting on a mat.", "The mat is green.", "Children play in a field."]


def _tokenizer(style):
    tokenizer = build_tiny_tokenizer(CORPUS, style=style)
    tokenizer.add_tokens(list(PLACEHOLDERS), special_tokens=True)
    return tokenizer


@pytest.fixture(scope="module", params=CHAT_STYLES)
def styled(request):
    return request.param, _tokenizer(request.param)


@pytest.fixture(scope="module")
def plain_tokenizer():
    """LLaMA-like specials and no chat template of its own."""
    return _tokenizer(None)


def _runs(mask):
    """Maximal runs of consecutive True positions, as lists of indices."""
    runs, current = [], []
    for i, flag in enumerate(mask):
        if flag:
            current.append(i)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    return runs


def _labelled_texts(tokenizer, out: TokenizedConversation):
    runs = _runs([label != IGNORE_INDEX for label in out.labels])
    return [tokenizer.decode([out.labels[i] for i in run]) for run in runs]


def _question_texts(tokenizer, out: TokenizedConversation):
    return [tokenizer.decode([out.input_ids[i] for i in run]) for run in _runs(out.question_mask)]


def _squeeze(text):
    return "".join(text.split())


def _placeholder_ids(tokenizer):
    return {p: tokenizer.convert_tokens_to_ids(p) for p in PLACEHOLDERS}


# --------------------------------------------------------------------------- labels


def test_labels_are_exactly_the_answers_plus_end_of_turn(styled):
    style, tokenizer = styled
    messages = THREE_ROUNDS[:2]
    out = tokenize_conversation(tokenizer, messages, record_id="r1")

    assert _labelled_texts(tokenizer, out) == [ANSWER_LEAD[style] + ANSWERS[0] + END_OF_TURN[style]]
    for token, label in zip(out.input_ids, out.labels):
        assert label in (IGNORE_INDEX, token)
    # The end-of-turn token itself is the last labelled token.
    eos = tokenizer.convert_tokens_to_ids(END_OF_TURN[style].strip())
    assert eos in [label for label in out.labels if label != IGNORE_INDEX]


def test_every_assistant_turn_of_a_multi_turn_conversation_is_labelled(styled):
    style, tokenizer = styled
    out = tokenize_conversation(tokenizer, THREE_ROUNDS, record_id="r3", system_prompt="Be brief.")

    expected = [ANSWER_LEAD[style] + answer + END_OF_TURN[style] for answer in ANSWERS]
    assert _labelled_texts(tokenizer, out) == expected
    # Nothing from user turns, the system prompt or the template is labelled.
    labelled = "".join(_labelled_texts(tokenizer, out))
    for fragment in ("What", "colour", "Listen", "Be brief", "[INST]", "user", "assistant<"):
        assert fragment not in labelled


def test_question_mask_is_exactly_the_user_text(styled):
    _, tokenizer = styled
    out = tokenize_conversation(tokenizer, THREE_ROUNDS, record_id="q", system_prompt="Be brief.")

    questions = _question_texts(tokenizer, out)
    # A placeholder splits a user turn into two runs; join each turn's runs back up.
    assert _squeeze("".join(questions)) == _squeeze("".join(USER_TEXTS))
    assert [q.strip() for q in questions] == ["What is shown in the image?", "What colour is the mat?",
                                              "Listen to", "and describe it."]
    assert not any(q and label != IGNORE_INDEX for q, label in zip(out.question_mask, out.labels))
    placeholder_ids = set(_placeholder_ids(tokenizer).values())
    assert not any(q for token, q in zip(out.input_ids, out.question_mask) if token in placeholder_ids)


def test_placeholders_survive_as_single_unlabelled_tokens(styled):
    _, tokenizer = styled
    messages = [
        {"role": "user", "content": "<image>\n<video> <audio> <speech> What happens?"},
        {"role": "assistant", "content": "A dog runs."},
    ]
    out = tokenize_conversation(tokenizer, messages, record_id="ph")

    for placeholder, token_id in _placeholder_ids(tokenizer).items():
        assert out.input_ids.count(token_id) == 1, placeholder
        position = out.input_ids.index(token_id)
        assert out.labels[position] == IGNORE_INDEX
        assert out.question_mask[position] is False


def test_generation_prompt_is_the_training_prefix_up_to_the_answer(styled):
    _, tokenizer = styled
    train = tokenize_conversation(tokenizer, THREE_ROUNDS, record_id="g")
    gen = tokenize_conversation(tokenizer, THREE_ROUNDS, record_id="g", for_generation=True)

    last_answer_start = _runs([label != IGNORE_INDEX for label in train.labels])[-1][0]
    assert gen.input_ids == train.input_ids[:last_answer_start]
    assert gen.question_mask == train.question_mask[:last_answer_start]
    assert set(gen.labels) == {IGNORE_INDEX}
    # A conversation already ending in a user turn gives the same prompt.
    assert tokenize_conversation(tokenizer, THREE_ROUNDS[:-1], for_generation=True) == gen


def test_system_prompt_is_rendered_but_never_labelled_nor_question(styled):
    style, tokenizer = styled
    out = tokenize_conversation(tokenizer, THREE_ROUNDS[:2], record_id="s", system_prompt="Answer briefly.")
    text = tokenizer.decode(out.input_ids)
    assert "Answer briefly." in text
    assert "Answer" not in "".join(_question_texts(tokenizer, out))
    if style == "llama-2":
        assert text.startswith("<s>[INST] <<SYS>>\nAnswer briefly.\n<</SYS>>\n\n<image>\nWhat")
    if style == "qwen2":
        assert "You are a helpful assistant." not in text


def test_qwen2_default_system_message_when_none_given():
    tokenizer = _tokenizer("qwen2")
    out = tokenize_conversation(tokenizer, THREE_ROUNDS[:2])
    text = tokenizer.decode(out.input_ids)
    assert text.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n")
    assert "helpful" not in "".join(_question_texts(tokenizer, out))


def test_input_messages_are_not_modified(styled):
    _, tokenizer = styled
    messages = [dict(m) for m in THREE_ROUNDS]
    tokenize_conversation(tokenizer, messages, system_prompt="x", for_generation=True)
    assert messages == THREE_ROUNDS


# --------------------------------------------------------------------------- templates


def test_builtin_llama2_template_layout(plain_tokenizer):
    messages = [
        {"role": "system", "content": "SYS"},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "yo"},
        {"role": "user", "content": "again"},
    ]
    rendered = plain_tokenizer.apply_chat_template(messages, chat_template=LLAMA2_CHAT_TEMPLATE, tokenize=False)
    assert rendered == "<s>[INST] <<SYS>>\nSYS\n<</SYS>>\n\nhi [/INST] yo </s><s>[INST] again [/INST]"
    without_system = plain_tokenizer.apply_chat_template(messages[1:3], chat_template=LLAMA2_CHAT_TEMPLATE,
                                                         tokenize=False)
    assert without_system == "<s>[INST] hi [/INST] yo </s>"


def test_tokenizer_without_template_falls_back_to_llama2(plain_tokenizer):
    assert plain_tokenizer.chat_template is None
    assert resolve_chat_template(plain_tokenizer) == LLAMA2_CHAT_TEMPLATE
    out = tokenize_conversation(plain_tokenizer, THREE_ROUNDS[:2], record_id="fb")
    assert plain_tokenizer.decode(out.input_ids).startswith("<s>[INST] <image>\nWhat is shown")
    assert _labelled_texts(plain_tokenizer, out) == [" A cat sitting on a mat. </s>"]


def test_resolve_chat_template_choices():
    qwen = _tokenizer("qwen2")
    assert resolve_chat_template(qwen, "auto") == qwen.chat_template
    assert resolve_chat_template(qwen, "llama-2") == LLAMA2_CHAT_TEMPLATE
    assert resolve_chat_template(qwen, "plain") is None
    custom = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    assert resolve_chat_template(qwen, custom) == custom
    with pytest.raises(ValueError, match="auto.*llama-2.*plain"):
        resolve_chat_template(qwen, "vicuna")


def test_plain_template_is_placeholders_then_caption(plain_tokenizer):
    messages = [
        {"role": "user", "content": "Describe the image briefly.\n<image>"},
        {"role": "assistant", "content": "A cat sitting on a mat."},
    ]
    out = tokenize_conversation(plain_tokenizer, messages, "plain", record_id="p")
    image_id = plain_tokenizer.convert_tokens_to_ids("<image>")

    assert out.input_ids[:2] == [plain_tokenizer.bos_token_id, image_id]
    assert plain_tokenizer.decode(out.input_ids[2:]) == "A cat sitting on a mat.</s>"
    assert out.labels[:2] == [IGNORE_INDEX, IGNORE_INDEX]
    assert out.labels[2:] == out.input_ids[2:]
    assert not any(out.question_mask)

    gen = tokenize_conversation(plain_tokenizer, messages, "plain", for_generation=True)
    assert gen.input_ids == [plain_tokenizer.bos_token_id, image_id]
    assert set(gen.labels) == {IGNORE_INDEX}


def test_plain_template_without_bos_token():
    qwen = _tokenizer("qwen2")
    messages = [{"role": "user", "content": "<image>"}, {"role": "assistant", "content": "A dog."}]
    out = tokenize_conversation(qwen, messages, "plain")
    assert out.input_ids[0] == qwen.convert_tokens_to_ids("<image>")
    assert qwen.decode(out.input_ids[1:]) == "A dog.<|im_end|>"


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "messages",
    [
        [{"role": "assistant", "content": "hi"}],
        [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}],
        [{"role": "human", "content": "a"}, {"role": "gpt", "content": "b"}],
        [{"role": "user", "content": "a"}, {"role": "system", "content": "b"}],
        [{"role": "system", "content": "only"}],
        [{"role": "user", "content": ["a list"]}],
        [{"role": "user"}],
    ],
)
def test_malformed_conversations_name_the_record(plain_tokenizer, messages):
    with pytest.raises(ValueError, match="rec-7"):
        tokenize_conversation(plain_tokenizer, messages, record_id="rec-7")


def test_empty_conversation(plain_tokenizer):
    with pytest.raises(ValueError, match="rec-0.*empty"):
        tokenize_conversation(plain_tokenizer, [], record_id="rec-0")


@pytest.mark.parametrize("template", ["auto", "plain"])
def test_training_without_an_assistant_turn(plain_tokenizer, template):
    messages = [{"role": "user", "content": "<image> hello"}]
    with pytest.raises(LabelAlignmentError, match="rec-3.*all labels masked"):
        tokenize_conversation(plain_tokenizer, messages, template, record_id="rec-3")
    # The same conversation is a valid generation prompt.
    assert tokenize_conversation(plain_tokenizer, messages, template, for_generation=True).input_ids


def test_template_whose_prefixes_change_is_rejected(plain_tokenizer):
    # Writing the message count first makes every shorter render differ from the full one.
    broken = "{{ messages | length }}{% for m in messages %}|{{ m['content'] }}{% endfor %}"
    with pytest.raises(LabelAlignmentError, match="rec-9.*prefix"):
        tokenize_conversation(plain_tokenizer, THREE_ROUNDS[:2], broken, record_id="rec-9")


def test_token_straddling_the_answer_boundary_is_rejected(plain_tokenizer):
    # The generation prompt ends mid-word, so BPE merges it with the answer ("Ans" + "wers" -> "Answers").
    glued = (
        "{% for m in messages %}{% if m['role'] == 'user' %}{{ m['content'] }}\nAns"
        "{% else %}{{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}"
    )
    messages = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "wers"}]
    with pytest.raises(LabelAlignmentError, match="rec-s.*straddles"):
        tokenize_conversation(plain_tokenizer, messages, glued, record_id="rec-s")


def test_placeholder_that_is_not_a_token(plain_tokenizer):
    bare = build_tiny_tokenizer(CORPUS)
    with pytest.raises(ValueError, match="rec-p.*<image>.*add_tokens"):
        tokenize_conversation(bare, THREE_ROUNDS[:2], record_id="rec-p")


def test_slow_tokenizer_is_rejected():
    class SlowTokenizer:
        is_fast = False

    with pytest.raises(TypeError, match="fast tokenizer"):
        tokenize_conversation(SlowTokenizer(), THREE_ROUNDS[:2])
