"""MoRA on a ZeRO-3-partitioned model (issue 5, item 3): merging gathers the partitioned base
weights, factors and shared factors first, and merged equals unmerged; saving inside
``mllm.distributed.gathered_parameters`` writes complete factors that a plain process loads.

A real DeepSpeed engine in one process (gloo): even with one rank, ZeRO-3 keeps every parameter
partitioned outside the engine's forward (``weight.shape == (0,)``), so a merge that forgot to
gather would fail or write nothing.
"""

from __future__ import annotations

import json
import subprocess
import sys

import torch
from peft import PeftModel

from tests.train.test_deepspeed import ROOT, _free_port, _launch_env
from tests.tuners.mora_helpers import clip_inputs, clip_outputs, tiny_clip

SCRIPT = r"""
import json, sys
import deepspeed, torch
from peft import get_peft_model

import mllm
from mllm.distributed import gathered_parameters
from mllm.tuners.mora import MoraConfig, MoraLayer
from tests.tuners.mora_helpers import clip_inputs, tiny_clip

ds_config = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3}}
deepspeed.init_distributed(dist_backend="gloo")
config = MoraConfig(target_modules=["q_proj", "v_proj"], num_paired_layers=2, init_weights=False)
clip = tiny_clip()
# DeepSpeed cannot partition 0-dim parameters; CLIP's logit_scale is one (it is not adapted).
clip.logit_scale = torch.nn.Parameter(clip.logit_scale.detach().reshape(1))
model = get_peft_model(clip, config)
engine, *_ = deepspeed.initialize(model=model, config=ds_config)
inputs = clip_inputs()
layer = next(m for m in model.modules() if isinstance(m, MoraLayer))
partitioned = tuple(layer.get_base_layer().weight.shape)
engine.eval()
with torch.no_grad():
    unmerged = engine(**inputs)
    model.base_model.merge_adapter()
    merged = engine(**inputs)
report = {"partitioned_shape": partitioned,
          "max_diff": max(float((unmerged[k] - merged[k]).abs().max()) for k in ("image_embeds", "text_embeds")),
          "scale": float(unmerged["image_embeds"].abs().max())}
with torch.no_grad():
    model.base_model.unmerge_adapter()
    restored = engine(**inputs)
report["unmerge_diff"] = float((restored["image_embeds"] - unmerged["image_embeds"]).abs().max())
with torch.no_grad(), model.disable_adapter():
    report["base_diff"] = float((engine(**inputs)["image_embeds"] - unmerged["image_embeds"]).abs().max())
with gathered_parameters(list(model.parameters())):
    model.save_pretrained(sys.argv[1])
report["unmerged"] = torch.cat([unmerged["image_embeds"], unmerged["text_embeds"]], -1).tolist()
print("REPORT" + json.dumps(report))
"""


def test_merge_under_zero3_gathers_and_equals_unmerged(tmp_path):
    env = {**_launch_env(), "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(_free_port())}
    result = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path / "adapter")], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads(result.stdout.split("REPORT", 1)[1])
    assert report["partitioned_shape"] == [0]            # the merge really met partitioned weights
    assert report["base_diff"] > 1e-3                    # the adapter changes the outputs ...
    assert report["max_diff"] < 1e-4                     # ... and merging into the weights keeps them
    assert report["unmerge_diff"] < 1e-4
    # The adapter saved from the partitioned model is complete: a plain process reproduces it.
    reloaded = PeftModel.from_pretrained(_clip_without_scalar_parameters(), str(tmp_path / "adapter")).eval()
    torch.testing.assert_close(clip_outputs(reloaded, clip_inputs()), torch.tensor(report["unmerged"]),
                               rtol=1e-4, atol=1e-5)


def _clip_without_scalar_parameters():
    clip = tiny_clip()
    clip.logit_scale = torch.nn.Parameter(clip.logit_scale.detach().reshape(1))
    return clip
