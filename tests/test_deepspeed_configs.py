"""The shipped DeepSpeed configs: valid JSON, the right ZeRO stage, Trainer-filled values."""

from __future__ import annotations

import json
import os

import pytest

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "deepspeed_configs")


@pytest.mark.parametrize("name,stage,offload", [("zero2.json", 2, False), ("zero2_offload.json", 2, True),
                                                ("zero3.json", 3, False), ("zero3_offload.json", 3, True)])
def test_config(name, stage, offload):
    cfg = json.load(open(os.path.join(ROOT, name)))
    zero = cfg["zero_optimization"]
    assert zero["stage"] == stage
    assert ("offload_optimizer" in zero) == offload
    # Batch sizes, clipping and precision come from TrainingArguments ("auto").
    for key in ("train_micro_batch_size_per_gpu", "train_batch_size", "gradient_accumulation_steps",
                "gradient_clipping"):
        assert cfg[key] == "auto"
    assert cfg["bf16"]["enabled"] == "auto" and cfg["fp16"]["enabled"] == "auto"
    # No optimizer block: the Trainer's optimizer keeps the projector learning-rate group.
    assert "optimizer" not in cfg and "scheduler" not in cfg
    if stage == 3:
        assert zero["stage3_gather_16bit_weights_on_model_save"] is True
