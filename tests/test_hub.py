"""`mllm push` and loading by Hub id, tested at the `HfApi` boundary (no network): exactly which
files and which card would be uploaded, then the model loaded back from those files."""

from __future__ import annotations

import json
import os

import pytest
import torch
import yaml

from mllm import hub
from mllm.config import config_from_dict
from mllm.model import MultimodalLM
from mllm.train.stages import run_instruct, run_pretrain
from tests.conftest import model_section
from tests.test_modality_context import _batch

SECRET = "hf_NotARealTokenButMustNeverAppear"
REPO = "my-org/tiny-mllm"


class FakeHubApi:
    """Records what `push_checkpoint` sends; `files` is the repository after the commit."""

    def __init__(self):
        self.repos, self.commits, self.files = [], [], {}

    def create_repo(self, repo_id, private=None, exist_ok=False, repo_type=None):
        self.repos.append({"repo_id": repo_id, "private": private, "repo_type": repo_type})

    def create_commit(self, repo_id, operations, revision=None, repo_type=None, commit_message=None):
        self.commits.append({"repo_id": repo_id, "revision": revision, "message": commit_message})
        for op in operations:
            source = op.path_or_fileobj
            self.files[op.path_in_repo] = open(source, "rb").read() if isinstance(source, str) else bytes(source)
        return f"https://huggingface.co/{repo_id}/commit/0"

    def write(self, folder) -> str:
        for rel, content in self.files.items():
            os.makedirs(os.path.dirname(os.path.join(folder, rel)), exist_ok=True)
            with open(os.path.join(folder, rel), "wb") as f:
                f.write(content)
        return str(folder)


def _experiment(tiny_assets, demo_data, out, stage, **training):
    return config_from_dict({
        "model": model_section(tiny_assets),
        "tuner": {"type": "lora", "r": 4, "alpha": 8} if stage == "instruct" else {"type": "none"},
        "data": {"train": demo_data["instruct" if stage == "instruct" else "pretrain"],
                 "media_root": demo_data["media_root"], "template": "auto" if stage == "instruct" else "plain"},
        "training": {"output_dir": str(out), "max_steps": 1, "per_device_train_batch_size": 4, "use_cpu": True,
                     "disable_tqdm": True, "report_to": "none", "save_steps": 1, **training}})


@pytest.fixture(scope="module")
def stage2_dir(tiny_assets, demo_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("hub-stage2")
    run_instruct(_experiment(tiny_assets, demo_data, out, "instruct"))
    return out


@pytest.fixture
def eval_dir(tmp_path):
    folder = tmp_path / "eval-pope"
    folder.mkdir()
    (folder / "results_official.json").write_text(json.dumps(
        {"suite": "pope", "mode": "official", "num_samples": 16,
         "metrics": {"mean_over_splits": {"accuracy": 0.8125, "f1": 0.75}, "splits": {}}}))
    return folder


def test_push_uploads_exactly_the_model_files_and_a_card(stage2_dir, eval_dir, monkeypatch, capsys, caplog):
    monkeypatch.setenv("HF_TOKEN", SECRET)
    api = FakeHubApi()
    url = hub.push_checkpoint(str(stage2_dir), REPO, private=True, base_model="meta-llama/Llama-2-7b-hf",
                              eval_results=[str(eval_dir)], api=api)
    assert url.startswith(f"https://huggingface.co/{REPO}")
    assert api.repos == [{"repo_id": REPO, "private": True, "repo_type": "model"}]
    assert set(api.files) == {
        "README.md", "mllm_config.json", "projectors.safetensors", "projectors.json", "experiment.yaml",
        "prompt_format.json",
        "adapter/adapter_config.json", "adapter/adapter_model.safetensors", "tokenizer.json",
        "tokenizer_config.json", "eval/pope/results_official.json"}
    # Never: Trainer checkpoints, the pickled training arguments, peft's own adapter card.
    assert any(name.startswith("checkpoint-") for name in os.listdir(stage2_dir))
    assert (stage2_dir / "training_args.bin").is_file() and (stage2_dir / "adapter" / "README.md").is_file()

    card = api.files["README.md"].decode()
    meta = yaml.safe_load(card.split("---")[1])
    assert meta["library_name"] == "peft" and meta["base_model"] == "meta-llama/Llama-2-7b-hf"
    assert "lora" in meta["tags"] and "modality:visual" in meta["tags"]
    assert "**Tuner:** lora (r=4, alpha=8)" in card
    assert "**Training data:** `instruct.jsonl`" in card
    assert "| pope | official | mean_over_splits/accuracy | 0.8125 |" in card
    assert f'MultimodalLM.from_pretrained("{REPO}")' in card
    # The token never shows: not printed, not logged, not in any uploaded file.
    out = capsys.readouterr()
    assert SECRET not in out.out + out.err + caplog.text
    assert all(SECRET.encode() not in content for content in api.files.values())


def test_a_local_base_model_is_not_claimed_as_a_hub_id(stage2_dir):
    card = str(hub.model_card(str(stage2_dir), REPO))
    meta = yaml.safe_load(card.split("---")[1])
    assert "base_model" not in meta and "**Base model:** `tiny-llama`" in card
    assert "## Evaluation" not in card  # no results given


def test_loading_by_hub_id_gives_the_same_model(stage2_dir, tmp_path, monkeypatch):
    api = FakeHubApi()
    hub.push_checkpoint(str(stage2_dir), REPO, api=api)
    repo_folder = api.write(tmp_path / "hub-repo")
    downloads = []

    def fake_snapshot_download(repo_id, revision=None, allow_patterns=None):
        downloads.append((repo_id, revision))
        return repo_folder

    monkeypatch.setattr(hub, "snapshot_download", fake_snapshot_download)
    from_hub = MultimodalLM.from_pretrained(REPO, revision="main")
    local = MultimodalLM.from_pretrained(str(stage2_dir))
    assert downloads == [(REPO, "main")]
    batch = _batch(local, "right")
    with torch.no_grad():
        torch.testing.assert_close(from_hub(**batch).logits, local(**batch).logits)
    with pytest.raises(FileNotFoundError, match="neither a local folder nor a Hub model id"):
        MultimodalLM.from_pretrained(str(tmp_path / "missing"))


def test_the_stage_option_pushes_the_final_model(tiny_assets, demo_data, tmp_path, monkeypatch):
    api = FakeHubApi()
    monkeypatch.setattr(hub, "HfApi", lambda: api)
    out = tmp_path / "stage1"
    run_pretrain(_experiment(tiny_assets, demo_data, out, "pretrain", push_to_hub=True, hub_model_id=REPO,
                             save_steps=1000))
    assert api.repos[0]["repo_id"] == REPO and len(api.commits) == 1
    assert {"projectors.safetensors", "mllm_config.json", "README.md"} <= set(api.files)
    assert not any(name.startswith("adapter/") for name in api.files)  # stage 1: projectors only


def test_tokens_stay_out_of_configs_and_push_needs_a_repo(tiny_assets, demo_data, tmp_path):
    from mllm.config import ConfigError

    with pytest.raises(ConfigError, match="HF_TOKEN") as error:
        run_pretrain(_experiment(tiny_assets, demo_data, tmp_path, "pretrain", hub_token=SECRET))
    assert SECRET not in str(error.value)
    with pytest.raises(ConfigError, match="hub_model_id"):
        run_pretrain(_experiment(tiny_assets, demo_data, tmp_path, "pretrain", push_to_hub=True))


def test_push_command_is_registered(capsys):
    from mllm.cli import main

    assert main([]) == 0
    assert "push" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["push", "--help"])
    assert "HF_TOKEN" in capsys.readouterr().out
