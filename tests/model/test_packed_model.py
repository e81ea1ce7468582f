"""Packed rows in the MultimodalLM (``data.packing``): each sample computes exactly what it computes
alone, with no tuner, LoRA, MokA and DeLo; the modality ids, question mask and segments reach the
tuner layers per sample; MokA's cross-attention and DeLo's routing never cross a sample boundary."""

from __future__ import annotations

import json

import pytest
import torch

from mllm.config import TunerConfig, config_from_dict
from mllm.data.dataset import MultimodalCollator, MultimodalDataset
from mllm.data.packing import PackedCollator
from mllm.data.templates import IGNORE_INDEX
from mllm.modality import Modality
from mllm.model import MultimodalLM
from mllm.model.packing import SEGMENT_SDPA, packed_lm_kwargs, positions_from_segments
from tests.conftest import model_section

TUNERS = {
    "none": TunerConfig(type="none"),
    "lora": TunerConfig(type="lora", r=4, alpha=8, dropout=0.0, options={"init_lora_weights": False}),
    "moka": TunerConfig(type="moka", r=4, alpha=8, dropout=0.0,
                        options={"modalities": ["text", "visual"], "strengths": {"visual": 1.0},
                                 "init_weights": False}),
    "delo": TunerConfig(type="delo", r=2, alpha=4, dropout=0.0,
                        options={"num_experts": 4, "num_tasks": 1, "init_weights": False}),
}
#: Rows of sample indices: several samples per row, a text-only one among them, a row of one.
ROWS = [[0, 1, 4], [2, 3], [5]]


@pytest.fixture(scope="module")
def samples(demo_data, tiny_assets, tmp_path_factory):
    """Six training samples of different lengths: image questions (one and two turns) and text-only."""
    records = [json.loads(line) for line in open(demo_data["instruct"])][:12]
    records.sort(key=lambda r: len(r["conversations"]))
    chosen = [records[0], records[-1], records[1], records[-2], records[2]]
    chosen.insert(4, {"id": "text-only", "conversations": [
        {"from": "human", "value": "Name a colour that is not red."}, {"from": "gpt", "value": "blue"}]})
    path = tmp_path_factory.mktemp("packing") / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in chosen))
    model = _model(tiny_assets, "none")
    dataset = MultimodalDataset(str(path), model.tokenizer, model.media_specs(), media_root=demo_data["media_root"],
                                progress=False)
    return [dataset[i] for i in range(len(dataset))]


def _model(tiny_assets, tuner: str) -> MultimodalLM:
    torch.manual_seed(0)
    model = MultimodalLM.from_config(config_from_dict({"model": model_section(tiny_assets)}).model)
    if tuner != "none":
        model.apply_tuner(TUNERS[tuner])
    model.train()
    return model


def _batches(model, samples):
    order = [i for row in ROWS for i in row]
    unpacked = MultimodalCollator(model.tokenizer.pad_token_id, "right")([samples[i] for i in order])
    packed = PackedCollator(model.tokenizer.pad_token_id)([[samples[i] for i in row] for row in ROWS])
    return order, unpacked, packed


def _spans(packed):
    """(row, start, end) of every sample in the packed batch, in sample order."""
    spans = []
    for row, segments in enumerate(packed["segment_ids"]):
        for slot in range(int(segments.max()) + 1):
            where = (segments == slot).nonzero().view(-1)
            spans.append((row, int(where[0]), int(where[-1]) + 1))
    return spans


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}


def test_collator_lays_samples_end_to_end_with_their_segments(tiny_assets, samples):
    model = _model(tiny_assets, "none")
    order, unpacked, packed = _batches(model, samples)
    assert packed["input_ids"].shape[0] == len(ROWS)
    assert packed["input_ids"].shape[1] == max(sum(len(samples[i]["input_ids"]) for i in row) for row in ROWS)
    for k, (row, start, end) in enumerate(_spans(packed)):
        sample = samples[order[k]]
        assert torch.equal(packed["input_ids"][row, start:end], sample["input_ids"])
        assert torch.equal(packed["question_mask"][row, start:end], sample["question_mask"])
        # The first label is dropped: across a boundary it would be the previous sample's target.
        assert packed["labels"][row, start] == IGNORE_INDEX
        assert torch.equal(packed["labels"][row, start + 1:end], sample["labels"][1:])
        assert torch.equal(positions_from_segments(packed["segment_ids"])[row, start:end], torch.arange(end - start))
    assert bool((packed["attention_mask"] == (packed["segment_ids"] >= 0)).all())
    # Media in sample order: the order the model fills the placeholder positions in.
    assert torch.equal(packed["image_inputs"], unpacked["image_inputs"])
    # Every labelled token of the unpacked batch is a labelled token of the packed one.
    assert int((packed["labels"] != IGNORE_INDEX).sum()) == int((unpacked["labels"] != IGNORE_INDEX).sum())


@pytest.mark.parametrize("tuner", list(TUNERS))
def test_packed_rows_give_each_sample_its_unpacked_logits_loss_and_gradients(tiny_assets, samples, tuner):
    model = _model(tiny_assets, tuner)
    order, unpacked, packed = _batches(model, samples)

    out = model(**unpacked)
    out.loss.backward()
    want_grads = _grads(model)
    model.zero_grad()
    packed_out = model(**packed)
    packed_out.loss.backward()
    got_grads = _grads(model)
    assert model.base_llm.config._attn_implementation == SEGMENT_SDPA   # attention run per sample

    for k, (row, start, end) in enumerate(_spans(packed)):
        length = end - start
        assert torch.allclose(packed_out.logits[row, start:end], out.logits[k, :length], atol=1e-5), (tuner, k)
        # Each sample's own loss (mean over its labelled tokens) is its unpacked loss.
        labels = unpacked["labels"][k, 1:length]
        if bool((labels != IGNORE_INDEX).any()):
            alone = torch.nn.functional.cross_entropy(out.logits[k, :length - 1], labels, ignore_index=IGNORE_INDEX)
            in_row = torch.nn.functional.cross_entropy(packed_out.logits[row, start:end - 1],
                                                       packed["labels"][row, start + 1:end], ignore_index=IGNORE_INDEX)
            assert torch.allclose(in_row, alone, atol=1e-5)
    assert torch.allclose(packed_out.loss, out.loss, atol=1e-6)
    assert want_grads.keys() == got_grads.keys() and want_grads
    # The projectors, and the adapter (no tuner: the whole LLM), receive gradients.
    assert any(n.startswith("projectors.") for n in got_grads)
    assert any((f"{tuner}_" if tuner != "none" else "embed_tokens") in n for n in got_grads)
    for name, grad in want_grads.items():
        assert torch.allclose(got_grads[name], grad, atol=1e-5, rtol=1e-4), (tuner, name)


def test_tuner_layers_see_modality_ids_question_mask_and_segments_per_sample(tiny_assets, samples):
    model = _model(tiny_assets, "moka")
    order, unpacked, packed = _batches(model, samples)
    context = model.modality_context
    with torch.no_grad():
        model(**unpacked)
        ids, question = context.modality_ids.clone(), context.question_mask.clone()
        assert context.segment_ids is None
        model(**packed)
    assert context.segment_ids is not None and torch.equal(context.segment_ids, packed["segment_ids"])
    for k, (row, start, end) in enumerate(_spans(packed)):
        assert torch.equal(context.modality_ids[row, start:end], ids[k, :end - start])
        assert torch.equal(context.question_mask[row, start:end], question[k, :end - start])
    assert bool((context.modality_ids[packed["segment_ids"] < 0] == int(Modality.PAD)).all())
    assert bool((context.modality_ids == int(Modality.VISUAL)).any())


@pytest.mark.parametrize("tuner", ["moka", "delo"])
def test_changing_one_samples_image_leaves_its_row_neighbours_unchanged(tiny_assets, samples, tuner):
    """MokA: sample 1's image tokens attend only to sample 1's question; DeLo: sample 1's routing is
    its own. So a new image for sample 1 changes sample 1 and nothing else in the row."""
    model = _model(tiny_assets, tuner).eval()
    packed = PackedCollator(model.tokenizer.pad_token_id)([[samples[0], samples[1], samples[4]]])
    changed = dict(packed, image_inputs=packed["image_inputs"].clone())
    changed["image_inputs"][1] = torch.randn_like(changed["image_inputs"][1])
    with torch.no_grad():
        before, after = model(**packed).logits, model(**changed).logits
    (_, a0, a1), (_, b0, b1), (_, c0, c1) = _spans(packed)
    assert torch.equal(after[0, a0:a1], before[0, a0:a1])
    assert torch.equal(after[0, c0:c1], before[0, c0:c1])
    assert not torch.allclose(after[0, b0:b1], before[0, b0:b1])


def test_moka_query_tokens_attend_only_to_their_own_samples_question(tiny_assets, samples):
    """With the LLM's attention already isolated, a MokA interaction across samples would show as
    sample 0's image tokens changing when sample 1's question changes; they do not, while the
    interaction itself is live (sample 1's image codes change)."""
    from mllm.tuners.moka.routing import ModalityRouter

    model = _model(tiny_assets, "moka").eval()
    packed = PackedCollator(model.tokenizer.pad_token_id)([[samples[0], samples[1]]])
    router: ModalityRouter = model.llm.base_model.router
    with torch.no_grad():
        model(**packed)
    layout = next(iter(m.moka_layout["default"] for m in model.llm.modules() if hasattr(m, "moka_layout")))
    interaction = router.routes(layout, torch.float32, torch.device("cpu")).interaction
    segments = packed["segment_ids"]
    keys = interaction.key_index[..., 0]                               # (1, Nk) key positions
    open_keys = interaction.key_bias[0] == 0                           # (T, Nk)
    queries = interaction.strength[0, :, 0] != 0
    assert {int(s) for s in segments[0, queries]} == {0, 1}            # both samples' image tokens query
    for t in range(segments.shape[1]):
        if interaction.strength[0, t, 0] != 0:
            assert bool((segments[0, keys[0][open_keys[t]]] == segments[0, t]).all())
            assert bool(open_keys[t].any())


def test_flash_attention_gets_the_samples_lengths():
    """flash-attention's varlen kernel takes the cumulative lengths over the flattened batch; the
    padding of each row is a sequence of its own."""
    segments = torch.tensor([[0, 0, 0, 1, 1, -1], [0, 0, 0, 0, 0, 0]])
    config = type("Config", (), {"_attn_implementation": "flash_attention_2"})()
    kwargs = packed_lm_kwargs(config, segments)
    assert kwargs["attention_mask"] is None and kwargs["use_cache"] is False
    assert kwargs["cu_seq_lens_q"].tolist() == [0, 3, 5, 6, 12] and kwargs["max_length_q"] == 6
    assert kwargs["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 4, 5]]
    assert config._attn_implementation == "flash_attention_2"


def test_sdpa_is_switched_to_per_sample_attention_and_eager_is_left_alone():
    segments = torch.tensor([[0, 0, 0, 1, 1, -1], [0, 0, 0, 0, 0, 0]])
    sdpa = type("Config", (), {"_attn_implementation": "sdpa"})()
    kwargs = packed_lm_kwargs(sdpa, segments)
    assert sdpa._attn_implementation == SEGMENT_SDPA
    assert kwargs["cu_seq_lens_q"].tolist() == [0, 3, 5, 6, 12] and "max_length_q" not in kwargs
    eager = type("Config", (), {"_attn_implementation": "eager"})()
    assert "cu_seq_lens_q" not in packed_lm_kwargs(eager, segments) and eager._attn_implementation == "eager"


def _llama(implementation: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, attn_implementation=implementation)
    return LlamaForCausalLM(config)


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
def test_llama_attention_paths_keep_packed_samples_apart(implementation):
    """Each packed sample's logits and gradients are its own, on sdpa (run per sample,
    SEGMENT_SDPA; grouped-query heads here) and eager (transformers' block-diagonal mask)."""
    llm = _llama(implementation)
    a, b = torch.randint(0, 64, (1, 5)), torch.randint(0, 64, (1, 7))
    segments = torch.tensor([[0] * 5 + [1] * 7 + [-1] * 2, [0] * 7 + [1] * 5 + [2] * 2])
    ids = torch.cat([torch.cat([a, b, torch.zeros(1, 2, dtype=torch.long)], 1), torch.cat([b, a, a[:, :2]], 1)])
    packed = llm(input_ids=ids, **packed_lm_kwargs(llm.config, segments)).logits
    assert llm.config._attn_implementation == (SEGMENT_SDPA if implementation == "sdpa" else "eager")
    alone_a, alone_b = llm(input_ids=a).logits[0], llm(input_ids=b).logits[0]
    for got, want in ((packed[0, :5], alone_a), (packed[0, 5:12], alone_b), (packed[1, :7], alone_b),
                      (packed[1, 7:12], alone_a), (packed[1, 12:], alone_a[:2])):
        assert torch.allclose(got, want, atol=1e-5)
    # Gradients: the packed rows' loss on the samples' tokens equals the samples' own summed.
    llm.zero_grad()
    (packed[0, :12].sum() + packed[1].sum()).backward()
    got = {n: p.grad.clone() for n, p in llm.named_parameters()}
    llm.zero_grad()
    (2 * alone_a.sum() + 2 * alone_b.sum() + llm(input_ids=a[:, :2]).logits.sum()).backward()
    for name, param in llm.named_parameters():
        assert torch.allclose(got[name], param.grad, atol=1e-4, rtol=1e-4), name


def test_per_sample_attention_is_sdpa_for_unpacked_batches():
    """Once switched, the LM still runs unpacked (padded) batches and generation as sdpa does."""
    llm, reference = _llama("sdpa").eval(), _llama("sdpa").eval()
    segments = torch.tensor([[0] * 4 + [1] * 3])
    ids = torch.randint(0, 64, (2, 6))
    mask = torch.tensor([[1] * 6, [1] * 4 + [0] * 2])
    with torch.no_grad():
        llm(input_ids=torch.randint(0, 64, (1, 7)), **packed_lm_kwargs(llm.config, segments))
        assert llm.config._attn_implementation == SEGMENT_SDPA
        assert torch.allclose(llm(input_ids=ids, attention_mask=mask).logits,
                              reference(input_ids=ids, attention_mask=mask).logits, atol=1e-6)
        left = torch.tensor([[0, 0, 1, 1, 1, 1], [1] * 6])
        assert torch.equal(llm.generate(input_ids=ids, attention_mask=left, max_new_tokens=4, do_sample=False),
                           reference.generate(input_ids=ids, attention_mask=left, max_new_tokens=4, do_sample=False))


def test_per_sample_attention_under_activation_checkpointing():
    """The recomputed forward (activation checkpointing) runs per sample too: same gradients."""
    segments = torch.tensor([[0] * 5 + [1] * 7 + [-1] * 2])
    ids = torch.randint(0, 64, (1, 14))
    grads = []
    for checkpointing in (False, True):
        llm = _llama("sdpa").train()
        if checkpointing:
            llm.activation_checkpointing_enable({"use_reentrant": False})
        llm(input_ids=ids, labels=ids, **packed_lm_kwargs(llm.config, segments)).loss.backward()
        assert llm.config._attn_implementation == SEGMENT_SDPA
        grads.append({n: p.grad for n, p in llm.named_parameters()})
    for name, grad in grads[0].items():
        assert torch.allclose(grads[1][name], grad, atol=1e-6), name


def test_a_sliding_window_keeps_transformers_masked_path():
    """Per-sample attention is plain causal attention; a layer with a sliding window (here shorter
    than the samples) runs sdpa on transformers' mask instead, which isolates the samples too."""
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    llm = MistralForCausalLM(MistralConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                           num_attention_heads=4, num_key_value_heads=2, sliding_window=3,
                                           attn_implementation="sdpa")).eval()
    a, b = torch.randint(0, 64, (1, 6)), torch.randint(0, 64, (1, 7))
    with torch.no_grad():
        packed = llm(input_ids=torch.cat([a, b], 1),
                     **packed_lm_kwargs(llm.config, torch.tensor([[0] * 6 + [1] * 7]))).logits
        assert llm.config._attn_implementation == SEGMENT_SDPA
        assert torch.allclose(packed[0, :6], llm(input_ids=a).logits[0], atol=1e-5)
        assert torch.allclose(packed[0, 6:], llm(input_ids=b).logits[0], atol=1e-5)
