"""`mllm export`: the folder loads in a fresh process with the original folders moved away and generates identically."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from mllm.config import config_from_dict
from mllm.model import MultimodalLM
from tests.conftest import model_section
from tests.train.test_stages import TRAINING, generate_token_ids

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PROBE_SCRIPT = """
import json, sys
from mllm.model import MultimodalLM
from tests.test_export import probe
print(json.dumps(probe(MultimodalLM.from_pretrained(sys.argv[1]), sys.argv[2], sys.argv[3])))
"""


def probe(model, eval_path, media_root) -> dict:
    """Greedy new tokens for every eval prompt and the next-token logits of the first four prompts."""
    from mllm.data.dataset import MultimodalCollator, MultimodalDataset

    ids = generate_token_ids(model, eval_path, media_root)
    dataset = MultimodalDataset(eval_path, model.tokenizer, model.media_specs(), media_root=media_root,
                                for_generation=True, progress=False)
    batch = MultimodalCollator(model.tokenizer.pad_token_id, "left")([dataset[i] for i in range(4)])
    batch.pop("labels", None)
    with torch.no_grad():
        logits = model(**batch).logits[:, -1]
    return {"ids": ids, "logits": logits.tolist()}


@pytest.fixture(scope="module")
def lora_run(tiny_assets, demo_data, tmp_path_factory):
    """A LoRA stage-2 run over private copies of the tiny LLM and CLIP (so they can be moved away)."""
    from mllm.train.stages import run_instruct

    root = tmp_path_factory.mktemp("export")
    originals = root / "originals"
    assets = {name: str(shutil.copytree(path, originals / name)) for name, path in tiny_assets.items()}
    cfg = config_from_dict({
        "model": model_section(assets), "data": {"train": demo_data["instruct"], "media_root": demo_data["media_root"]},
        "tuner": {"type": "lora", "r": 4, "alpha": 8, "dropout": 0.0},
        "training": {**TRAINING, "output_dir": str(originals / "run"), "max_steps": 2},
    })
    run_instruct(cfg)
    checkpoint = str(originals / "run")
    live = probe(MultimodalLM.from_pretrained(checkpoint), demo_data["eval"], demo_data["media_root"])
    return {"root": root, "originals": originals, "checkpoint": checkpoint, "live": live}


def _probe_in_fresh_process(folder, demo_data) -> dict:
    out = subprocess.run([sys.executable, "-c", PROBE_SCRIPT, str(folder), demo_data["eval"], demo_data["media_root"]],
                         capture_output=True, text=True, cwd=REPO_ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"},
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_export_with_adapter_and_merged_load_without_the_originals(lora_run, demo_data):
    from mllm.cli import main
    from mllm.data.processor import MediaProcessor

    kept, merged = lora_run["root"] / "export-adapter", lora_run["root"] / "export-merged"
    assert main(["export", lora_run["checkpoint"], str(kept)]) == 0
    assert main(["export", lora_run["checkpoint"], str(merged), "--merge"]) == 0
    moved = lora_run["root"] / "moved-away"
    os.rename(lora_run["originals"], moved)
    try:
        for folder in (kept, merged):
            config = json.loads((folder / "mllm_config.json").read_text())
            assert config["model"]["llm"] == "./llm"
            assert config["model"]["encoders"]["visual"]["path"] == "./encoders/visual"
            assert ({"prompt_format.json", "projectors.safetensors", "README.md", "tokenizer.json"}
                    <= set(os.listdir(folder)))
            # The media processor finds the bundled CLIP (./encoders/visual) on its own.
            assert MediaProcessor.from_pretrained(str(folder)).num_media_tokens("<image>") == 4
        assert os.path.isdir(kept / "adapter") and not os.path.exists(merged / "adapter")
        assert "stays separate in `adapter/`" in (kept / "README.md").read_text()
        assert "merged into the weights" in (merged / "README.md").read_text()

        live = lora_run["live"]
        assert len(live["ids"]) == 16
        from_kept = _probe_in_fresh_process(kept, demo_data)
        assert from_kept["ids"] == live["ids"]
        torch.testing.assert_close(torch.tensor(from_kept["logits"]), torch.tensor(live["logits"]), rtol=0, atol=1e-6)
        from_merged = _probe_in_fresh_process(merged, demo_data)
        torch.testing.assert_close(torch.tensor(from_merged["logits"]), torch.tensor(live["logits"]),
                                   rtol=1e-4, atol=1e-4)
        assert from_merged["ids"] == live["ids"]
        # The merged LLM is a plain model: LoRA lives in its weights, not beside them.
        from safetensors.torch import load_file

        assert not any("lora_" in key for key in load_file(str(merged / "llm" / "model.safetensors")))
    finally:
        os.rename(moved, lora_run["originals"])


def test_moka_stays_an_adapter_and_merge_is_refused_with_the_reason(tiny_model, tmp_path, capsys):
    from mllm.cli import main
    from mllm.config import TunerConfig
    from mllm.export import export_checkpoint
    from tests.eval_suites.test_runner import MOKA

    tiny_model.apply_tuner(TunerConfig(**MOKA))
    tiny_model.save_pretrained(str(tmp_path / "moka"))
    assert main(["export", str(tmp_path / "moka"), str(tmp_path / "merged"), "--merge"]) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("mllm export: error: --merge: a moka adapter cannot be merged") and "per token" in error
    summary = export_checkpoint(str(tmp_path / "moka"), str(tmp_path / "kept"))
    assert summary["adapter"] == "adapter/" and not summary["merged"]
    card = (tmp_path / "kept" / "README.md").read_text()
    assert "It cannot be merged: MokA routes each token" in card
    reloaded = MultimodalLM.from_pretrained(str(tmp_path / "kept"))
    assert reloaded.tuner_config.type == "moka"
    with pytest.raises(ValueError, match="not empty"):
        export_checkpoint(str(tmp_path / "moka"), str(tmp_path / "kept"))
