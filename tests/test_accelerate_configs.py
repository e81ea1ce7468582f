"""The shipped accelerate configs: loadable by accelerate, pointing at shipped DeepSpeed JSON, and
free of the keys accelerate refuses beside a DeepSpeed JSON."""

from __future__ import annotations

import glob
import os

import pytest
from accelerate.commands.config.config_args import load_config_from_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(glob.glob(os.path.join(ROOT, "configs", "accelerate", "*.yaml")))
# accelerate raises when these sit in its config while a deepspeed_config_file is given.
OWNED_BY_DEEPSPEED_JSON = {"gradient_accumulation_steps", "gradient_clipping", "zero_stage",
                           "offload_optimizer_device", "offload_param_device", "zero3_save_16bit_model",
                           "mixed_precision"}


def test_multi_gpu_and_multi_node_examples_are_shipped():
    names = {os.path.basename(p) for p in CONFIGS}
    assert {"multi_gpu.yaml", "zero2.yaml", "zero3.yaml", "multi_node_zero3.yaml", "multi_node_ddp.yaml"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_config_loads_and_is_consistent(path):
    cfg = load_config_from_file(path)
    assert cfg.compute_environment.value == "LOCAL_MACHINE"
    assert cfg.num_processes % cfg.num_machines == 0, "processes must split evenly over machines"
    if cfg.num_machines > 1:
        assert cfg.main_process_ip and cfg.main_process_port, "multi-node needs the main machine's address"
    if cfg.distributed_type.value == "DEEPSPEED":
        ds = cfg.deepspeed_config
        assert os.path.isfile(os.path.join(ROOT, ds["deepspeed_config_file"])), ds["deepspeed_config_file"]
        assert not OWNED_BY_DEEPSPEED_JSON & set(ds)
        assert cfg.mixed_precision is None  # precision is the experiment YAML's (training.bf16)
        assert ds["zero3_init_flag"] == ("zero3" in ds["deepspeed_config_file"])
        if cfg.num_machines > 1:
            assert ds["deepspeed_multinode_launcher"] == "standard"
