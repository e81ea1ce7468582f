"""One registry for every stage: each tuner is registered once per backbone kind it adapts (the
MLLM's causal LM, CLIP for ``mllm classify``, ViLT for ``mllm cmml``), every registered entry is
reached from the stage of its backbone, a name the stage cannot use is a ConfigError listing the
registry's names for that backbone, and a new tuner is one registration away from every stage."""

from __future__ import annotations

import pytest
import torch
from peft import IA3Config, PeftModel, get_peft_model

from mllm.classify.train import build_classifier as build_clip_classifier
from mllm.classify.train import load_classify_config
from mllm.config import TunerConfig
from mllm.continual.cmml import DeloClassifier, SequentialLoraClassifier
from mllm.continual.stage import build_classifier as build_vilt_classifier
from mllm.continual.stage import load_cmml_config
from mllm.errors import ConfigError
from mllm.tuners import (
    BACKBONES,
    CAUSAL_LM,
    CLIP,
    TUNER_REGISTRY,
    VILT,
    build_peft_config,
    register_tuner,
    tuner_capability,
    tuner_names,
)
from tests.classify.helpers import write_tiny_clip
from tests.tuners.delo_helpers import tiny_vilt, vilt_inputs
from tests.tuners.mora_helpers import clip_inputs

ENTRIES = [(name, backbone) for name, entry in sorted(TUNER_REGISTRY.items()) for backbone in entry.builders]


@pytest.fixture(scope="module")
def clip_path(tmp_path_factory):
    return write_tiny_clip(str(tmp_path_factory.mktemp("clip") / "clip"))


def _trainable_backbone(model, backbone: torch.nn.Module) -> set[str]:
    ids = {id(p) for p in backbone.parameters()}
    return {n for n, p in model.named_parameters() if p.requires_grad and id(p) in ids}


def _through_the_llm_stage(name: str, _clip_path: str) -> None:
    config = build_peft_config(TunerConfig(type=name, r=4, alpha=8))
    assert type(config) is TUNER_REGISTRY[name].config_class


def _through_the_classify_stage(name: str, clip_path: str) -> None:
    cfg = load_classify_config(None, [f"model.backbone={clip_path}", f"tuner.type={name}",
                                      "data.dataset=hateful_memes"])
    model = build_clip_classifier(cfg)
    config_class = TUNER_REGISTRY[name].config_class
    if config_class is None:   # a baseline that adds no adapter
        assert not isinstance(model.clip, PeftModel)
    else:
        assert type(model.clip.peft_config["default"]) is config_class
        trainable = _trainable_backbone(model, model.clip)
        assert trainable and all(model.clip.base_model.prefix in n for n in trainable), trainable
    inputs = clip_inputs()
    assert model(inputs["input_ids"], inputs["attention_mask"], inputs["pixel_values"]).shape == (3, 2)


def _through_the_cmml_stage(name: str, _clip_path: str) -> None:
    cfg = load_cmml_config(None, [f"tuner.type={name}", "tuner.r=2", "tuner.num_experts=4"])
    model = build_vilt_classifier(cfg, tiny_vilt(), num_tasks=2, labels_per_task=2, multilabel=False)
    assert type(model.backbone.peft_config["default"]) is TUNER_REGISTRY[name].config_class
    expected = DeloClassifier if tuner_capability(name, "partitions_tasks") else SequentialLoraClassifier
    assert type(model) is expected
    trainable = _trainable_backbone(model, model.backbone)
    assert trainable and all(model.backbone.base_model.prefix in n for n in trainable), trainable
    with torch.no_grad():
        assert model(vilt_inputs()).shape == (3, 2)


STAGES = {CAUSAL_LM: _through_the_llm_stage, CLIP: _through_the_classify_stage, VILT: _through_the_cmml_stage}


def test_every_backbone_kind_has_a_stage_and_the_stages_reach_the_expected_tuners():
    assert set(STAGES) == set(BACKBONES)
    assert tuner_names(CLIP) == ["bitfit", "dora", "frozen", "full", "lora", "mora"]
    assert tuner_names(VILT) == ["delo", "lora"]


@pytest.mark.parametrize("name,backbone", ENTRIES, ids=[f"{b}-{n}" for n, b in ENTRIES])
def test_every_registered_tuner_is_reached_from_the_stage_of_its_backbone(name, backbone, clip_path):
    STAGES[backbone](name, clip_path)


def _error(stage, name: str, clip_path: str) -> str:
    with pytest.raises(ConfigError) as caught:
        stage(name, clip_path)
    return str(caught.value)


@pytest.mark.parametrize("backbone", sorted(BACKBONES))
def test_an_unknown_name_lists_the_registry_names_for_the_backbone(backbone, clip_path):
    message = _error(STAGES[backbone], "fancy", clip_path)
    assert message.startswith("tuner.type: unknown tuner type 'fancy'"), message
    listed = message.rsplit(": ", 1)[1].split(", ")
    assert listed == (["none"] if backbone == CAUSAL_LM else []) + tuner_names(backbone)


@pytest.mark.parametrize("backbone,name", [(CAUSAL_LM, "bitfit"), (CLIP, "delo"), (VILT, "mora")])
def test_a_tuner_of_another_backbone_is_refused_with_the_valid_names(backbone, name, clip_path):
    message = _error(STAGES[backbone], name, clip_path)
    assert f"tuner.type: '{name}' does not adapt {BACKBONES[backbone]}" in message
    assert message.endswith(", ".join((["none"] if backbone == CAUSAL_LM else []) + tuner_names(backbone)))


def test_the_demos_compare_registered_tuners():
    from mllm.demo.continual import METHODS
    from mllm.demo.missing import TUNERS

    assert set(TUNERS) <= set(tuner_names(CLIP)) and set(METHODS) <= set(tuner_names(VILT))


def test_a_new_tuner_is_one_registration_away_from_every_stage(clip_path):
    """A sixth tuner (peft's IA3 here) registered for CLIP and ViLT trains in both stages with no
    edit to either: the classify stage wraps CLIP with it, the CMML stage trains it task after task."""

    def ia3(backbone, options):
        clip = backbone.config.model_type == "clip"
        targets = ["k_proj", "v_proj", "fc2"] if clip else ["key", "value", "output.dense"]
        return get_peft_model(backbone, IA3Config(target_modules=targets, feedforward_modules=targets[-1:]))

    try:
        register_tuner("ia3", IA3Config, backbone=CLIP)(ia3)
        register_tuner("ia3", IA3Config, backbone=VILT)(ia3)
        assert "ia3" in _error(_through_the_classify_stage, "fancy", clip_path)
        assert "ia3" not in tuner_names(CAUSAL_LM)
        _through_the_classify_stage("ia3", clip_path)
        _through_the_cmml_stage("ia3", clip_path)
    finally:
        TUNER_REGISTRY.pop("ia3", None)


@pytest.mark.parametrize("stage,backbone", [("classify", CLIP), ("cmml", VILT)])
def test_stage_help_lists_the_registry_tuners_of_its_backbone(stage, backbone, capsys):
    from mllm.cli import sectioned_stage_main

    with pytest.raises(SystemExit):
        sectioned_stage_main(stage, ["--help"])
    listed = capsys.readouterr().out.split("tuners (tuner.type): ", 1)[1].split()
    assert [name.rstrip(",") for name in listed] == tuner_names(backbone)


def test_continuing_an_mllm_run_refuses_a_tuner_of_another_backbone():
    """The continuation step asks for the LLM tuner's config class: a CLIP-only baseline is named as such."""
    from mllm.tuners import tuner_config_class

    assert tuner_config_class("delo") is TUNER_REGISTRY["delo"].config_class
    with pytest.raises(ConfigError, match="'bitfit' does not adapt the MLLM's causal LM"):
        tuner_config_class("bitfit")
