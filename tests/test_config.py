"""The one YAML schema, command-line overrides and their errors."""

from __future__ import annotations

import pytest

from mllm.config import ConfigError, load_config


def _write(tmp_path, text):
    path = tmp_path / "exp.yaml"
    path.write_text(text)
    return str(path)


YAML = """
model:
  llm: ./models/llm
  encoders:
    visual: {type: clip, path: openai/clip-vit-large-patch14}
  projectors:
    visual: {num_queries: 16}
tuner: {type: lora, r: 8}
data: {train: ../data/train.jsonl}
training: {output_dir: out, learning_rate: 1.0e-4}
"""


def test_yaml_with_overrides(tmp_path):
    cfg = load_config(_write(tmp_path, YAML), ["tuner.r=32", "training.learning_rate=3e-5",
                                               "model.encoders.visual.select_layer=-1", "data.max_length=128"])
    assert cfg.tuner.r == 32 and cfg.training["learning_rate"] == 3e-5
    assert cfg.model.encoders["visual"].select_layer == -1
    assert cfg.model.projectors["visual"].num_queries == 16
    assert cfg.data.max_length == 128
    # './' and '../' paths are relative to the YAML file; HF ids are left alone.
    assert cfg.model.llm == str(tmp_path / "models" / "llm")
    assert cfg.data.train == str(tmp_path.parent / "data" / "train.jsonl")
    assert cfg.model.encoders["visual"].path == "openai/clip-vit-large-patch14"


@pytest.mark.parametrize("override,message", [
    ("tuner.rank=4", r"tuner: unknown field\(s\) \['rank'\]"),
    ("model.encoders.smell.type=clip", "unknown modality 'smell'"),
    ("optimizer.lr=1", "unknown top-level section"),
    ("data.on_bad_sample=ignore", "must be 'error' or 'skip'"),
    ("tuner.r", "must look like section.field=value"),
])
def test_bad_fields_are_named(tmp_path, override, message):
    with pytest.raises((ConfigError, ValueError), match=message):
        load_config(_write(tmp_path, YAML), [override])


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(str(tmp_path / "nope.yaml"))
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(_write(tmp_path, "model: [unclosed"))


def test_unknown_training_argument_is_named(tmp_path):
    from mllm.train.stages import training_arguments

    cfg = load_config(_write(tmp_path, YAML), ["training.learning_rat=1"])
    with pytest.raises(ConfigError, match="learning_rat"):
        training_arguments(cfg)


def test_demo_configs_parse():
    import os

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for folder in ("demo", "demo/visual"):
        for stage in ("pretrain", "instruct"):
            cfg = load_config(os.path.join(root, "configs", folder, f"{stage}.yaml"))
            assert cfg.model.encoders["visual"].type == "clip"
            assert ("audio" in cfg.model.encoders) == (folder == "demo")
            assert cfg.training["output_dir"]


def test_classify_and_cmml_configs_use_the_one_loader(tmp_path):
    """The classification and continual stages read their YAML as the stages do: typed numbers,
    nested sections, unknown sections and fields named, the same `training` section name."""
    from mllm.classify.train import load_classify_config
    from mllm.continual.stage import load_cmml_config

    path = tmp_path / "classify.yaml"
    path.write_text("training:\n  lr: 1e-3\ndata:\n  test_missing: {ratio: 0.3}\n")
    cfg = load_classify_config(str(path), ["training.epochs=2"])
    assert cfg.training.lr == 1e-3 and isinstance(cfg.training.lr, float) and cfg.training.epochs == 2
    assert cfg.data.test_missing.ratio == 0.3 and cfg.data.test_missing.type == "both"
    with pytest.raises(ConfigError, match=r"unknown top-level section\(s\) \['train'\]"):
        load_classify_config(None, ["train.lr=1"])
    with pytest.raises(ConfigError, match=r"data\.test_missing: unknown field\(s\) \['ratoi'\]"):
        load_classify_config(None, ["data.test_missing.ratoi=0.5"])
    cmml = load_cmml_config(None, ["tuner.r=2", "training.lr=1e-2"])
    assert cmml.tuner == {"r": 2, "num_experts": 16, "alpha": 2.0} and cmml.training.lr == 1e-2
    with pytest.raises(ConfigError, match="benchmark must be one of"):
        load_cmml_config(None, ["data.benchmark=cifar"])
    with pytest.raises(ConfigError, match=r"training\.lr='abc': expected a number"):
        load_classify_config(None, ["training.lr=abc"])


@pytest.mark.parametrize("override,message", [
    # Fails today deep in torch's scheduler ("can't multiply sequence by non-int").
    ("training.learning_rate=abc", r"exp\.yaml: training\.learning_rate='abc': expected a number"),
    ("training.max_steps=2.5", r"exp\.yaml: training\.max_steps=2\.5: expected an integer"),
    ("training.save_strategy=sometimes", r"exp\.yaml: training\.save_strategy='sometimes': expected one of "
                                         r"\['no', 'steps', 'epoch', 'best'\]"),
    ("training.bf16=maybe", r"exp\.yaml: training\.bf16='maybe': expected true/false"),
])
def test_bad_training_values_name_the_field_and_file(tmp_path, override, message):
    from mllm.train.stages import training_arguments

    cfg = load_config(_write(tmp_path, YAML), [override])
    with pytest.raises(ConfigError, match=message):
        training_arguments(cfg)


def test_bad_section_values_name_the_field_and_file(tmp_path):
    with pytest.raises(ConfigError, match=r"exp\.yaml: tuner\.r='abc': expected an integer"):
        load_config(_write(tmp_path, YAML), ["tuner.r=abc"])
    with pytest.raises(ConfigError, match=r"exp\.yaml: model\.encoders\.visual\.select_layer='last'"):
        load_config(_write(tmp_path, YAML), ["model.encoders.visual.select_layer=last"])


def test_yaml_no_is_the_strategy_no_and_numbers_in_strings_are_numbers(tmp_path):
    """YAML reads `no` as False; TrainingArguments wants the string 'no'."""
    from mllm.train.stages import training_arguments

    cfg = load_config(_write(tmp_path, YAML), ["training.save_strategy=no", "training.eval_strategy=no",
                                               "training.learning_rate='2e-4'", "training.use_cpu=true"])
    args = training_arguments(cfg)
    assert args.save_strategy == "no" and args.eval_strategy == "no" and args.learning_rate == 2e-4
    assert cfg.training["save_strategy"] == "no"  # saved with the run as read


def test_a_missing_local_model_path_names_the_field_and_how_it_resolved(tmp_path):
    from mllm.config import check_local_paths

    cfg = load_config(_write(tmp_path, YAML))   # model.llm: ./models/llm, next to the config file
    with pytest.raises(ConfigError) as err:
        check_local_paths(cfg)
    message = str(err.value)
    assert message.startswith(f"model.llm in {tmp_path / 'exp.yaml'}: "
                              f"local path not found: {tmp_path / 'models' / 'llm'}")
    assert f"against the config file's folder {tmp_path}" in message and "Repo id" not in message
    (tmp_path / "models" / "llm").mkdir(parents=True)
    with pytest.raises(ConfigError, match=r"data\.train in .*: data file not found: .*data/train\.jsonl"):
        check_local_paths(cfg)
    # A Hub id (org/name) is left to the Hub.
    assert cfg.model.encoders["visual"].path == "openai/clip-vit-large-patch14"
