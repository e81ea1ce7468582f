"""MokA on packed rows (``ModalityContext.segment_ids``): every cross-attention mode keeps each
sample's interaction inside the sample, so a row of two samples gives each its own-row output."""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model

from mllm.modality_context import set_modality_ids
from mllm.tuners.moka import MokaConfig
from tests.tuners.moka_helpers import A, OneLinear, P, T, V

#: Two samples of a packed row: (ids, question mask). The second has no audio and a longer question.
FIRST = ([T, V, V, A, T, T, T], [0, 0, 0, 0, 1, 1, 0])
SECOND = ([T, V, V, V, T, T, T, T, T], [0, 0, 0, 0, 1, 1, 1, 0, 0])


def _model(mode: str):
    torch.manual_seed(0)
    config = MokaConfig(r=4, alpha=8, target_modules=["proj"], modalities=["text", "visual", "audio"],
                        strengths={"text": 1.0, "visual": 1.0, "audio": 0.5}, cross_attention=mode, init_weights=False)
    return get_peft_model(OneLinear(), config).eval()


@pytest.mark.parametrize("mode", ["task_centric", "naive", "projected", "text_queries"])
def test_a_packed_row_gives_each_sample_its_own_output(mode):
    model = _model(mode)
    x = torch.randn(1, len(FIRST[0]) + len(SECOND[0]) + 2, 12)
    cut = len(FIRST[0])
    ids = torch.tensor([FIRST[0] + SECOND[0] + [P, P]])
    question = torch.tensor([FIRST[1] + SECOND[1] + [0, 0]], dtype=torch.bool)
    segments = torch.tensor([[0] * cut + [1] * len(SECOND[0]) + [-1, -1]])
    with torch.no_grad():
        set_modality_ids(model, ids, question, segment_ids=segments)
        packed = model(x)
        alone = []
        for start, end in ((0, cut), (cut, cut + len(SECOND[0]))):
            set_modality_ids(model, ids[:, start:end], question[:, start:end])
            alone.append(model(x[:, start:end]))
        # Without the segments the row would be one sample: the interaction would cross the boundary.
        set_modality_ids(model, ids, question)
        as_one = model(x)
    assert torch.allclose(packed[:, :cut], alone[0], atol=1e-6)
    assert torch.allclose(packed[:, cut:cut + len(SECOND[0])], alone[1], atol=1e-6)
    assert not torch.allclose(as_one[:, :cut + len(SECOND[0])], packed[:, :cut + len(SECOND[0])], atol=1e-4)
