"""The optional norm on the projector's output tokens (``ProjectorConfig.output_norm``)."""

from __future__ import annotations

import json

import pytest
import torch

from mllm.config import ConfigError, config_from_dict
from mllm.projectors import (
    ProjectorCheckpointError,
    QFormerProjector,
    build_projectors,
    load_projector_weights,
    load_projectors,
    save_projectors,
)
from tests.conftest import model_section
from tests.projectors.test_projectors import _config


def _token_norms(projector, seed=0):
    torch.manual_seed(seed)
    with torch.no_grad():
        return projector.eval()(torch.randn(3, 17, 24) * 5).norm(dim=-1)


def test_off_by_default_keeps_the_module_and_its_weights_as_before():
    projector = QFormerProjector(_config())
    assert projector.config.output_norm is None and projector.output_norm is None
    assert not any(key.startswith("output_norm") for key in projector.state_dict())
    norms = _token_norms(projector)
    assert float(norms.std()) > 0.01          # raw MLP outputs: each token its own norm


@pytest.mark.parametrize("kind", ["rmsnorm", "layernorm"])
def test_output_tokens_start_at_the_target_norm(kind):
    torch.manual_seed(0)
    projector = QFormerProjector(_config(output_norm=kind, output_target_norm=3.2))
    torch.manual_seed(0)
    plain = QFormerProjector(_config())
    assert torch.allclose(_token_norms(projector), torch.full((3, 6), 3.2), atol=1e-3)
    assert not torch.allclose(_token_norms(plain), torch.full((3, 6), 3.2), atol=0.5)
    # The gain is a trained parameter, so the norm can move away from the target in training.
    assert projector.output_norm.weight.requires_grad
    with torch.no_grad():
        projector.output_norm.weight.mul_(2)
    assert torch.allclose(_token_norms(projector), torch.full((3, 6), 6.4), atol=2e-3)


def test_without_a_target_the_norm_is_the_plain_one():
    projector = QFormerProjector(_config(output_norm="rmsnorm"))
    assert torch.allclose(_token_norms(projector), torch.full((3, 6), 40 ** 0.5), atol=1e-3)


def test_the_norm_round_trips_through_save_and_load(tmp_path):
    projectors = build_projectors({"visual": _config(output_norm="rmsnorm", output_target_norm=3.2)})
    with torch.no_grad():
        projectors["visual"].output_norm.weight.uniform_(0.1, 0.9)   # as if trained
    save_projectors(projectors, tmp_path)
    saved = json.load(open(tmp_path / "projectors.json"))["visual"]
    assert saved["output_norm"] == "rmsnorm" and saved["output_target_norm"] == 3.2
    loaded = load_projectors(str(tmp_path))
    assert isinstance(loaded["visual"].output_norm, torch.nn.RMSNorm)
    assert torch.equal(loaded["visual"].output_norm.weight, projectors["visual"].output_norm.weight)
    x = torch.randn(2, 5, 24)
    assert torch.equal(projectors.eval()["visual"](x), loaded.eval()["visual"](x))
    # A projector without the norm refuses these weights, naming the extra tensor.
    with pytest.raises(ProjectorCheckpointError, match=r"unexpected: \['visual\.output_norm\.weight'\]"):
        load_projector_weights(build_projectors({"visual": _config()}), str(tmp_path))


def test_the_model_fills_the_target_from_the_llms_token_embeddings(tiny_assets):
    from transformers import AutoModelForCausalLM

    from mllm.model import MultimodalLM

    embeddings = AutoModelForCausalLM.from_pretrained(tiny_assets["llm"]).get_input_embeddings().weight.detach()
    target = float(embeddings.norm(dim=-1).mean())
    section = model_section(tiny_assets)
    section["projectors"]["visual"]["output_norm"] = "layernorm"
    model = MultimodalLM.from_config(config_from_dict({"model": section}).model)
    assert model.projectors["visual"].config.output_target_norm == pytest.approx(target, rel=1e-5)
    with torch.no_grad():
        features = model.eval().encode_media("<image>", model.processor.dummy_media("<image>"))
    assert torch.allclose(features.norm(dim=-1), torch.full(features.shape[:2], target), rtol=1e-3)


def test_an_unknown_norm_is_a_config_error_naming_the_field(tiny_assets):
    section = model_section(tiny_assets)
    section["projectors"]["visual"]["output_norm"] = "batchnorm"
    with pytest.raises(ConfigError, match=r"model\.projectors\.visual: output_norm must be one of"):
        config_from_dict({"model": section})
