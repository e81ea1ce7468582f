"""The prompt record: training writes it, evaluation renders exactly the training prompt from it."""

from __future__ import annotations

import json
import logging
import os

import pytest

from mllm.checkpoint import PROMPT_RECORD_FILE, PromptRecord, read_prompt_record, training_prompt_record
from mllm.config import config_from_dict
from mllm.data.dataset import MultimodalDataset
from mllm.data.templates import IGNORE_INDEX
from mllm.model import MultimodalLM
from tests.conftest import model_section
from tests.train.test_stages import TRAINING

# Not what `auto` gives the tiny tokenizer (LLaMA-2): a ChatML-like template of our own.
CUSTOM_TEMPLATE = (
    "{%- for m in messages -%}"
    "{{- '<|' ~ m['role'] ~ '|>\\n' ~ m['content'] ~ '<|end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|assistant|>\\n' -}}{%- endif -%}"
)
SYSTEM_PROMPT = "You are a careful observer of shapes."


@pytest.fixture(scope="module")
def trained(tiny_assets, demo_data, tmp_path_factory):
    """A tiny stage-2 run whose one training record asks exactly POPE's question."""
    from eval_suites import get_suite
    from mllm.train.stages import run_instruct

    root = tmp_path_factory.mktemp("prompt-record")
    with open(demo_data["eval"]) as f:
        image = json.loads(f.readline())["image"]
    pope_file = root / "coco_pope_random.json"
    pope_file.write_text(json.dumps({"question_id": 1, "image": image, "text": "Is there a circle in the image?",
                                     "label": "yes"}) + "\n")
    suite = get_suite("pope")
    question = suite.prompt(suite.load(str(pope_file))[0])
    train_file = root / "train.jsonl"
    train_file.write_text(json.dumps({"id": "t1", "image": image, "conversations": [
        {"from": "human", "value": question}, {"from": "gpt", "value": "yes"}]}) + "\n")
    cfg = config_from_dict({
        "model": model_section(tiny_assets),
        "data": {"train": str(train_file), "media_root": demo_data["media_root"], "template": CUSTOM_TEMPLATE,
                 "system_prompt": SYSTEM_PROMPT},
        "tuner": {"type": "lora", "r": 4, "alpha": 8},
        "training": {**TRAINING, "per_device_train_batch_size": 1, "output_dir": str(root / "run"),
                     "max_steps": 1},
    })
    run_instruct(cfg)
    return {"checkpoint": str(root / "run"), "pope": str(pope_file), "train": str(train_file), "root": root}


def _rendered_training_prompt(model, train_file, media_root) -> str:
    """The training sample's text up to (and including) the assistant turn's opening."""
    dataset = MultimodalDataset(train_file, model.tokenizer, model.media_specs(), template=CUSTOM_TEMPLATE,
                                system_prompt=SYSTEM_PROMPT, media_root=media_root, progress=False)
    sample = dataset[0]
    first_answer = next(i for i, label in enumerate(sample["labels"].tolist()) if label != IGNORE_INDEX)
    return model.tokenizer.decode(sample["input_ids"][:first_answer])


def _rendered_eval_prompts(model, monkeypatch, pope_file, media_root, out) -> list[str]:
    from eval_suites.runner import run_suite

    seen = []
    real_generate = MultimodalLM.generate

    def recording_generate(self, input_ids, attention_mask=None, **kwargs):
        for row, mask in zip(input_ids, attention_mask):
            seen.append(self.tokenizer.decode(row[mask.bool()]))
        return real_generate(self, input_ids, attention_mask, **kwargs)

    monkeypatch.setattr(MultimodalLM, "generate", recording_generate)
    run_suite("pope", model, pope_file, out, media_root=media_root, max_new_tokens=2, progress=False)
    return seen


def test_training_writes_the_record_and_evaluation_renders_the_training_prompt(trained, demo_data, monkeypatch):
    with open(os.path.join(trained["checkpoint"], PROMPT_RECORD_FILE)) as f:
        saved = json.load(f)
    assert saved["template"] == CUSTOM_TEMPLATE and saved["system_prompt"] == SYSTEM_PROMPT
    assert saved["do_sample"] is False and saved["origin"] == "recorded"

    model = MultimodalLM.from_pretrained(trained["checkpoint"])
    want = _rendered_training_prompt(model, trained["train"], demo_data["media_root"])
    assert want.startswith("<|system|>\n" + SYSTEM_PROMPT) and want.endswith("<|assistant|>\n")
    got = _rendered_eval_prompts(model, monkeypatch, trained["pope"], demo_data["media_root"],
                                 str(trained["root"] / "eval"))
    assert got == [want]


def test_an_old_checkpoint_without_a_record_loads_with_a_note(trained, demo_data, monkeypatch, caplog, tmp_path):
    import shutil

    old = tmp_path / "old"
    shutil.copytree(trained["checkpoint"], old)
    os.remove(old / PROMPT_RECORD_FILE)
    with caplog.at_level(logging.WARNING, logger="mllm.checkpoint"):
        model = MultimodalLM.from_pretrained(str(old))
    assert f"no {PROMPT_RECORD_FILE}" in caplog.text and "assuming template 'auto'" in caplog.text
    assert model.prompt_record.origin == "assumed" and model.prompt_record.template == "auto"
    got = _rendered_eval_prompts(model, monkeypatch, trained["pope"], demo_data["media_root"], str(tmp_path / "e"))
    # What evaluation always did: the tokenizer's template (LLaMA-2 here), no system prompt.
    assert got[0].startswith("<s>[INST] <image>") and SYSTEM_PROMPT not in got[0]


def test_an_explicit_option_overrides_and_is_recorded(trained):
    record = read_prompt_record(trained["checkpoint"])
    changed = record.overridden(system_prompt="Be brief.", template=None)
    assert changed.system_prompt == "Be brief." and changed.template == CUSTOM_TEMPLATE
    assert changed.overrides == {"system_prompt": "Be brief."}
    with pytest.raises(ValueError, match="unknown prompt-record field"):
        record.overridden(temperature=0.3)


def test_stage1_records_the_plain_format_and_template_end_of_turn_becomes_a_stop(tiny_assets):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_assets["llm"])
    plain = training_prompt_record(tokenizer, "plain", "ignored")
    assert plain.template == "plain" and plain.system_prompt is None
    assert plain.stop_token_ids == [tokenizer.eos_token_id]
    assert training_prompt_record(tokenizer, "auto", None).template == "llama-2"
    custom = training_prompt_record(tokenizer, CUSTOM_TEMPLATE, None)
    assert custom.stop_strings == ["<|end|>"]   # several tokens here: stopped on as text
    assert PromptRecord(**{k: v for k, v in custom.to_dict().items() if k != "format_version"}) == custom


def test_mllm_eval_system_prompt_overrides_the_record_and_is_recorded(trained, demo_data, monkeypatch, tmp_path):
    """`mllm eval --system-prompt` renders with the given prompt and records it as an override."""
    from mllm.cli import main

    seen = []
    real_generate = MultimodalLM.generate

    def recording_generate(self, input_ids, attention_mask=None, **kwargs):
        seen.extend(self.tokenizer.decode(row[mask.bool()]) for row, mask in zip(input_ids, attention_mask))
        return real_generate(self, input_ids, attention_mask, **kwargs)

    monkeypatch.setattr(MultimodalLM, "generate", recording_generate)
    out = tmp_path / "eval"
    assert main(["eval", "--suite", "pope", "--checkpoint", trained["checkpoint"], "--data", trained["pope"],
                 "--media-root", demo_data["media_root"], "--output-dir", str(out), "--max-new-tokens", "2",
                 "--system-prompt", "Answer briefly.", "--no-progress"]) == 0
    assert seen and seen[0].startswith("<|system|>\nAnswer briefly.") and SYSTEM_PROMPT not in seen[0]
    results = json.loads((out / "results_official.json").read_text())
    recorded = results["generation"]["prompt_format"]
    assert recorded["system_prompt"] == "Answer briefly." and recorded["overrides"] == ["system_prompt"]
