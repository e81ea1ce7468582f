"""Publishing a trained model to the Hugging Face Hub, and loading one back by its id.

A published repository holds exactly what ``MultimodalLM.from_pretrained`` reads, plus a card:

    README.md                           model card (library_name peft, base model, tuner, data, results)
    mllm_config.json                    model (LLM and encoders by id) + tuner config
    projectors.safetensors, projectors.json
    adapter/adapter_config.json, adapter/adapter_model.safetensors   (stage 2)
    tokenizer files                     the tokenizer with the placeholder tokens
    experiment.yaml                     the whole experiment config, when the run wrote one
    eval/<suite>/results_<mode>.json    evaluation results, when given

Never uploaded: Trainer checkpoints, ``training_args.bin`` (a pickle), optimizer and RNG states,
peft's generated adapter card. The token comes from ``HF_TOKEN`` or ``hf auth login``, through
``huggingface_hub``, and is never read, printed or written here.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import logging
import os
from typing import Iterable

import yaml
from huggingface_hub import CommitOperationAdd, HfApi, ModelCard, ModelCardData, snapshot_download
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id

from mllm.checkpoint import ADAPTER_DIR, EXPERIMENT_FILE, HUB_FILES, MLLM_CONFIG

logger = logging.getLogger(__name__)

def hub_files(checkpoint_dir: str) -> list[str]:
    """The checkpoint's files a published model holds, sorted, as paths relative to it."""
    if not os.path.isfile(os.path.join(checkpoint_dir, MLLM_CONFIG)):
        raise FileNotFoundError(f"{checkpoint_dir}: no {MLLM_CONFIG}; not an mllm checkpoint")
    found = []
    for name in ("", ADAPTER_DIR):
        folder = os.path.join(checkpoint_dir, name)
        if not os.path.isdir(folder):
            continue
        for entry in os.listdir(folder):
            rel = f"{name}/{entry}" if name else entry
            if os.path.isfile(os.path.join(folder, entry)) and any(fnmatch.fnmatch(rel, p) for p in HUB_FILES):
                found.append(rel)
    return sorted(found)


def read_eval_results(paths: Iterable[str]) -> dict[str, dict]:
    """``results_<mode>.json`` files (or folders holding them, searched recursively) ->
    ``{"eval/<suite>/results_<mode>.json": results}``."""
    files = []
    for path in paths:
        if os.path.isdir(path):
            for root, _, names in os.walk(path):
                files += [os.path.join(root, n) for n in sorted(names) if fnmatch.fnmatch(n, "results_*.json")]
        elif os.path.isfile(path):
            files.append(path)
        else:
            raise FileNotFoundError(f"evaluation results not found: {path}")
    results = {}
    for file in files:
        with open(file, encoding="utf-8") as f:
            result = json.load(f)
        if "suite" not in result or "mode" not in result:
            raise ValueError(f"{file}: not an evaluation results file (no 'suite' / 'mode')")
        results[f"eval/{result['suite']}/results_{result['mode']}.json"] = result
    return results


def _is_hub_id(name: str | None) -> bool:
    if not name or os.path.exists(name) or name.count("/") != 1:
        return False
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def _scalar_metrics(metrics, prefix: str = "") -> dict[str, float]:
    """Nested metric dicts flattened to ``a/b`` keys, numbers only."""
    if isinstance(metrics, bool):
        return {}
    if isinstance(metrics, (int, float)):
        return {prefix: metrics}
    if isinstance(metrics, dict):
        out = {}
        for key, value in metrics.items():
            out.update(_scalar_metrics(value, f"{prefix}/{key}" if prefix else str(key)))
        return out
    return {}


def model_card(checkpoint_dir: str, repo_id: str, base_model: str | None = None,
               eval_results: dict[str, dict] | None = None) -> ModelCard:
    """The card: YAML metadata (library_name peft, base_model when it is a Hub id, tags) and a
    body naming the base model, encoders, tuner, training data and evaluation results."""
    with open(os.path.join(checkpoint_dir, MLLM_CONFIG)) as f:
        saved = json.load(f)
    model, tuner = saved["model"], saved.get("tuner")
    base_model = base_model or model["llm"]
    experiment = {}
    if os.path.isfile(os.path.join(checkpoint_dir, EXPERIMENT_FILE)):
        with open(os.path.join(checkpoint_dir, EXPERIMENT_FILE)) as f:
            experiment = yaml.safe_load(f) or {}
    data = experiment.get("data") or {}
    # Local paths are named by their last part only: the card must not expose a machine's layout.
    from mllm.data.mixture import data_paths

    training_data = [os.path.basename(p) if os.path.exists(p) else p
                     for p in data_paths(data.get("train")) + data_paths(data.get("eval"))]
    modalities = sorted(model.get("encoders", {}))
    has_adapter = os.path.isfile(os.path.join(checkpoint_dir, ADAPTER_DIR, "adapter_config.json"))
    tuner_type = tuner["type"] if tuner and has_adapter else "none"
    card_data = ModelCardData(
        library_name="peft" if has_adapter else None,
        base_model=base_model if _is_hub_id(base_model) else None,
        tags=["mllm", "multimodal", *(f"modality:{m}" for m in modalities), *([tuner_type] if has_adapter else [])],
    )

    def shown(name):
        return f"[{name}](https://huggingface.co/{name})" if _is_hub_id(name) else f"`{os.path.basename(str(name))}`"

    lines = [f"# {repo_id.split('/')[-1]}", "",
             "A multimodal LLM trained with mllm: frozen encoders, Q-Former + MLP projectors and a "
             "parameter-efficient tuner inside the LLM.", "",
             f"- **Base model:** {shown(base_model)}"
             + (f" ({model['quantization']}, 4-bit)" if model.get("quantization") else ""),
             "- **Encoders:** " + ", ".join(f"{m}: {shown(e['path'])} ({e['type']})"
                                            for m, e in sorted(model["encoders"].items())),
             f"- **Tuner:** {tuner_type}" + (f" (r={tuner['r']}, alpha={tuner['alpha']})" if has_adapter else ""),
             "- **Training data:** " + (", ".join(f"`{d}`" for d in training_data) or "not recorded")]
    if eval_results:
        lines += ["", "## Evaluation", "", "| suite | mode | metric | value |", "|---|---|---|---|"]
        for result in eval_results.values():
            for metric, value in _scalar_metrics(result.get("metrics", {})).items():
                lines.append(f"| {result['suite']} | {result['mode']} | {metric} | {value:.4g} |")
    lines += ["", "## Use", "", "```python", "from mllm.model import MultimodalLM", "",
              f'model = MultimodalLM.from_pretrained("{repo_id}")', "```", ""]
    return ModelCard(f"---\n{card_data.to_yaml()}\n---\n\n" + "\n".join(lines))


def push_checkpoint(checkpoint_dir: str, repo_id: str, *, private: bool | None = None, revision: str | None = None,
                    commit_message: str | None = None, base_model: str | None = None,
                    eval_results: Iterable[str] = (), api: HfApi | None = None) -> str:
    """Publish a stage-1 or stage-2 output folder as one commit; returns the commit URL."""
    files = hub_files(checkpoint_dir)
    results = read_eval_results(eval_results)
    card = model_card(checkpoint_dir, repo_id, base_model=base_model, eval_results=results)
    operations = [CommitOperationAdd(path_in_repo=rel, path_or_fileobj=os.path.join(checkpoint_dir, rel))
                  for rel in files]
    operations += [CommitOperationAdd(path_in_repo=rel, path_or_fileobj=json.dumps(r, indent=2).encode())
                   for rel, r in results.items()]
    operations.append(CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=str(card).encode()))
    api = api or HfApi()
    api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    commit = api.create_commit(repo_id=repo_id, operations=operations, revision=revision, repo_type="model",
                               commit_message=commit_message or "Upload mllm model")
    logger.info("published %d files to %s", len(operations), repo_id)
    return str(getattr(commit, "commit_url", commit))


def resolve_checkpoint(name_or_path: str, revision: str | None = None) -> str:
    """A local checkpoint folder as is; a Hub model id downloaded (only the published files)."""
    if os.path.isdir(name_or_path):
        return name_or_path
    if not _is_hub_id(name_or_path):
        raise FileNotFoundError(f"{name_or_path}: neither a local folder nor a Hub model id (org/name)")
    return snapshot_download(repo_id=name_or_path, revision=revision, allow_patterns=[*HUB_FILES, "README.md"])


def push_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mllm push", description="Publish a stage-1 or stage-2 output folder to the Hugging Face Hub: "
        "projectors, adapter, configs, tokenizer and a model card. The token comes from HF_TOKEN or "
        "`hf auth login`.")
    parser.add_argument("checkpoint", help="output folder of `mllm pretrain` / `mllm instruct` (or a checkpoint in it)")
    parser.add_argument("repo_id", help="Hub repository, e.g. my-org/my-model")
    parser.add_argument("--private", action="store_true", help="create the repository private")
    parser.add_argument("--revision", help="branch to commit to")
    parser.add_argument("--commit-message")
    parser.add_argument("--base-model", help="Hub id of the base LLM for the card, when model.llm is a local path")
    parser.add_argument("--eval-results", nargs="*", default=[], metavar="PATH",
                        help="results_<mode>.json files of `mllm eval`, or folders holding them")
    return parser


def push_main(argv: list[str] | None = None) -> int:
    args = push_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    url = push_checkpoint(args.checkpoint, args.repo_id, private=args.private or None, revision=args.revision,
                          commit_message=args.commit_message, base_model=args.base_model,
                          eval_results=args.eval_results)
    print(f"published {args.checkpoint} -> {url}")
    return 0


__all__ = ["HUB_FILES", "hub_files", "model_card", "push_checkpoint", "push_main", "read_eval_results",
           "resolve_checkpoint"]
