"""Splicing media features at placeholder positions and computing modality ids."""

from __future__ import annotations

import pytest
import torch

from mllm.modality import MEDIA_INPUT_KEYS, Modality
from mllm.model.splice import MediaCountError, compute_modality_ids, splice_features


def test_each_feature_row_lands_at_its_placeholder_position():
    img = 99
    input_ids = torch.tensor([[5, img, img, 6, 7, 0],
                              [img, img, 8, img, img, 9]])
    embeds = torch.zeros(2, 6, 3)
    # Three images of two tokens each, numbered so every row is recognisable.
    features = torch.arange(3 * 2 * 3, dtype=torch.float).reshape(3, 2, 3)
    out = splice_features(embeds, input_ids, img, features)
    rows = features.reshape(-1, 3)
    positions = [(0, 1), (0, 2), (1, 0), (1, 1), (1, 3), (1, 4)]  # batch-major, then position
    for row, (b, t) in enumerate(positions):
        assert torch.equal(out[b, t], rows[row])
    text_positions = input_ids != img
    assert torch.equal(out[text_positions], embeds[text_positions])


def test_feature_count_mismatch_is_an_error():
    input_ids = torch.tensor([[1, 99, 99, 2]])
    with pytest.raises(MediaCountError, match="2 placeholder positions.*3 feature rows"):
        splice_features(torch.zeros(1, 4, 3), input_ids, 99, torch.zeros(1, 3, 3), what="<image>")


def test_modality_ids_mark_placeholders_text_and_padding():
    input_ids = torch.tensor([[0, 0, 5, 50, 50, 60, 7]])
    attention = torch.tensor([[0, 0, 1, 1, 1, 1, 1]])
    ids = compute_modality_ids(input_ids, {50: Modality.VISUAL, 60: Modality.AUDIO}, attention)
    assert ids.tolist() == [[-1, -1, 0, 1, 1, 2, 0]]


def test_model_splices_projected_features_into_the_llm_input(tiny_model):
    """The embeddings the LLM receives hold the projector output at the image positions and
    the token embeddings elsewhere."""
    model = tiny_model.eval()
    n_tok = model.num_media_tokens("<image>")
    img = model.placeholder_ids["<image>"]
    text = model.tokenizer("what color", add_special_tokens=False)["input_ids"]
    input_ids = torch.tensor([text[:1] + [img] * n_tok + text[1:]])
    pixels = torch.randn(1, 3, 32, 32)
    captured = {}
    hook = model.base_llm.register_forward_pre_hook(
        lambda m, a, kw: captured.update(embeds=kw["inputs_embeds"]), with_kwargs=True)
    with torch.no_grad():
        model(input_ids=input_ids, **{MEDIA_INPUT_KEYS["image"]: pixels})
        expected_media = model.encode_media("<image>", pixels)[0]
        expected_text = model.llm.get_input_embeddings()(torch.tensor(text))
    hook.remove()
    embeds = captured["embeds"][0]
    assert torch.allclose(embeds[1:1 + n_tok], expected_media)
    assert torch.allclose(embeds[0], expected_text[0])
    assert torch.allclose(embeds[1 + n_tok:], expected_text[1:])


def test_placeholders_without_media_are_an_error(tiny_model):
    img = tiny_model.placeholder_ids["<image>"]
    with pytest.raises(MediaCountError, match="no image_inputs"):
        tiny_model(input_ids=torch.tensor([[1, img, img, img, img, 2]]))


def test_generate_refuses_right_padded_prompts(tiny_model):
    input_ids = torch.tensor([[5, 6, 7], [5, 6, 0]])
    attention = torch.tensor([[1, 1, 1], [1, 1, 0]])
    with pytest.raises(ValueError, match="left-padded"):
        tiny_model.generate(input_ids=input_ids, attention_mask=attention, max_new_tokens=1)


def test_from_pretrained_on_a_folder_that_is_no_checkpoint(tmp_path):
    from mllm.model import MultimodalLM

    with pytest.raises(FileNotFoundError, match="not an mllm checkpoint"):
        MultimodalLM.from_pretrained(str(tmp_path))
