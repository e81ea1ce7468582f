"""DeLo on packed rows (``ModalityContext.segment_ids``, ``mllm.tuners.delo.packing``): the query
pass pools per sample, each sample is routed on its own and its tokens get only its own factors;
the Task-Key Memory and the alignment loss count samples, not rows."""

from __future__ import annotations

import torch
from peft import get_peft_model

from mllm.modality_context import set_modality_ids
from mllm.model.packing import packed_lm_kwargs
from mllm.tuners.delo import DeloConfig
from mllm.tuners.delo.packing import packed_samples, pool_per_sample
from tests.tuners.moka_helpers import P, T, V, tiny_llama

#: Two samples (modality ids); the first has visual tokens, the second is text only.
FIRST = [T, V, V, V, T, T]
SECOND = [T, T, T, T]


def _delo():
    config = DeloConfig(r=2, alpha=4, num_experts=4, num_tasks=1, init_weights=False,
                        target_modules=["q_proj", "v_proj", "down_proj"])
    return get_peft_model(tiny_llama(seed=0), config).train()   # training: the Task-Key Memory accumulates


def test_samples_and_pooling_follow_the_segments():
    segments = torch.tensor([[0, 0, 1, 1, 1, -1], [0, 0, 0, 0, 0, 0]])
    samples = packed_samples(segments)
    assert samples.row.tolist() == [0, 0, 1] and samples.slot.tolist() == [0, 1, 0] and samples.num_slots == 2
    assert samples.token_sample().tolist() == [[0, 0, 1, 1, 1, -1], [2, 2, 2, 2, 2, 2]]
    hidden = torch.arange(12.0).view(2, 6, 1)
    masks = torch.ones(2, 1, 6)
    pooled, available = pool_per_sample(hidden, masks, samples)
    assert pooled.view(-1).tolist() == [0.5, 3.0, 8.5] and available.all()


def test_a_packed_row_routes_each_sample_as_if_alone():
    ids = torch.tensor([FIRST + SECOND + [P]])
    segments = torch.tensor([[0] * len(FIRST) + [1] * len(SECOND) + [-1]])
    tokens = torch.randint(3, 64, ids.shape, generator=torch.Generator().manual_seed(0))
    cut = len(FIRST)

    packed_model, alone_model = _delo(), _delo()
    set_modality_ids(packed_model, ids, segment_ids=segments)
    packed = packed_model(input_ids=tokens, **packed_lm_kwargs(packed_model.config, segments))
    packed_loss = packed_model.base_model.alignment_loss()
    alone = []
    for start, end in ((0, cut), (cut, cut + len(SECOND))):
        set_modality_ids(alone_model, ids[:, start:end])
        alone.append(alone_model(input_ids=tokens[:, start:end]).logits)
    assert torch.allclose(packed.logits[:, :cut], alone[0], atol=1e-5)
    assert torch.allclose(packed.logits[:, cut:cut + len(SECOND)], alone[1], atol=1e-5)
    # One routing entry and one memory count per sample: the first sample has visual tokens, both text.
    assert packed_model.base_model.state.task_ids.tolist() == [0, 0]
    assert packed_model.base_model.delo_query["default"].counts[0].tolist() == [1, 2]
    assert torch.allclose(alone_model.base_model.delo_query["default"].counts,
                          packed_model.base_model.delo_query["default"].counts)
    assert packed_loss.item() >= 0
