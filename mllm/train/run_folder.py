"""Output folders belong to one run.

A run records a fingerprint of what decides its result -- the resolved config, less the fields
that only say where or how often it logs and saves, plus the size and SHA-256 of its data files
-- as ``run_fingerprint.json`` in its output folder and in every checkpoint it writes. Then:

* a new run into a folder that already holds files refuses (``training.overwrite_output_dir:
  true`` lets it, and first clears the run outputs it would replace);
* a resume refuses a checkpoint whose fingerprint differs, naming the fields that differ;
* a resume from a checkpoint that already finished all its steps refuses (it would train 0
  steps and leave the old weights as the output).

The checks read only (``check_output_dir``, before any model loads); the main process writes
(``claim_output_dir``, right before training starts).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from dataclasses import dataclass

from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint

from mllm.checkpoint import RUN_FINGERPRINT_FILE, TRAINER_STATE_FILE
from mllm.config import ConfigError, ExperimentConfig, config_to_dict
from mllm.data.mixture import SOURCES_DIR

logger = logging.getLogger(__name__)


# Fields that change where or how often a run logs, saves or evaluates, never the weights it trains
# (data.train: its contents are fingerprinted, not where the file lies).
NOT_RESULT_FIELDS = {
    "data.train", "data.eval", "data.on_bad_sample", "model.feature_cache",
    *(f"training.{name}" for name in (
        "output_dir", "overwrite_output_dir", "resume_from_checkpoint", "logging_dir", "logging_strategy",
        "logging_steps", "logging_first_step", "logging_nan_inf_filter", "log_level", "log_level_replica",
        "log_on_each_node", "save_strategy", "save_steps", "save_total_limit", "save_only_model",
        "save_safetensors", "save_on_each_node", "report_to", "run_name", "project", "trackio_space_id",
        "disable_tqdm", "push_to_hub", "hub_model_id", "hub_strategy", "hub_private_repo", "hub_revision",
        "hub_always_push", "eval_strategy", "eval_steps", "eval_delay", "per_device_eval_batch_size",
        "eval_accumulation_steps", "eval_on_start", "dataloader_num_workers", "dataloader_prefetch_factor",
        "dataloader_persistent_workers", "dataloader_pin_memory", "skip_memory_metrics",
        "include_num_input_tokens_seen")),
}

# What a stage writes into its output folder (cleared by training.overwrite_output_dir).
_RUN_OUTPUT = re.compile(rf"^({PREFIX_CHECKPOINT_DIR}-\d+|adapter|runs|{re.escape(RUN_FINGERPRINT_FILE)}|"
                         r"experiment\.yaml|"
                         r"trainer_state\.json|training_args\.bin|all_results\.json|train_results\.json|"
                         r"projectors\.(safetensors|json)|native_connector\.safetensors|mllm_config\.json|"
                         r"README\.md|chat_template\.jinja|"
                         r"(tokenizer|special_tokens_map|added_tokens)\S*|vocab\S*|merges\.txt)$")


def run_fingerprint(cfg: ExperimentConfig) -> dict:
    """``{"config": {field: value}, "data": {field: {"size", "sha256"}}}`` for this run."""
    flat = _flatten(config_to_dict(cfg))
    config = {key: value for key, value in flat.items() if key not in NOT_RESULT_FIELDS}
    data = {}
    for name in ("train",):
        value = getattr(cfg.data, name)
        if isinstance(value, str):
            if os.path.isfile(value):
                data[f"data.{name}"] = _file_fingerprint(value)
        elif value:   # native sources / a mixture: each source's settings, its file by contents
            sources = value if isinstance(value, list) else [value]
            data[f"data.{name}"] = [{**{k: v for k, v in source.items() if k not in ("path", "media_root")},
                                     **(_file_fingerprint(source["path"]) if os.path.isfile(source.get("path", ""))
                                        else {"path": source.get("path")})} for source in sources]
    # Through JSON once, so a fingerprint compares equal to its own saved copy (tuples, numbers).
    return json.loads(json.dumps({"config": config, "data": data}, default=str, sort_keys=True))


def _file_fingerprint(path: str) -> dict:
    return {"size": os.path.getsize(path), "sha256": _sha256(path)}


def differences(saved: dict, current: dict) -> list[str]:
    """``field: saved -> current`` for every field the two fingerprints disagree on."""
    out = []
    for part in ("config", "data"):
        before, after = saved.get(part, {}), current.get(part, {})
        for key in sorted(set(before) | set(after)):
            if before.get(key) != after.get(key):
                if part == "data":
                    out.append(f"{key} (file contents changed)")
                else:
                    out.append(f"{key}: {before.get(key, '(default)')!r} -> {after.get(key, '(default)')!r}")
    return out


@dataclass
class OutputPlan:
    """What ``check_output_dir`` decided: the checkpoint to resume from (None: fresh start) and
    the run outputs to clear first (overwrite)."""

    output_dir: str
    resume_from: str | None
    to_clear: list[str]
    fingerprint: dict


def check_output_dir(cfg: ExperimentConfig, output_dir: str, resume: str | bool | None,
                     overwrite: bool = False) -> OutputPlan:
    """Decide, reading only, whether this run may use ``output_dir``; a ConfigError says why not."""
    fingerprint = run_fingerprint(cfg)
    checkpoint = _resume_point(output_dir, resume)
    # The sources this run writes as LLaVA files (mllm.data.mixture) are rewritten by every run.
    entries = sorted(e for e in (os.listdir(output_dir) if os.path.isdir(output_dir) else []) if e != SOURCES_DIR)
    saved = _read_fingerprint(output_dir)
    if checkpoint is not None:
        _check_resume(checkpoint, fingerprint)
        # Resuming into another folder: that folder must be empty or hold this same run.
        if not entries or saved == fingerprint or os.path.samefile(os.path.dirname(os.path.abspath(checkpoint)),
                                                                    output_dir):
            return OutputPlan(output_dir, checkpoint, [], fingerprint)
    if entries and not overwrite:
        what = "another run" if saved is None or saved != fingerprint else "a run of this same config"
        shown = ", ".join(entries[:4]) + (", ..." if len(entries) > 4 else "")
        raise ConfigError(
            f"training.output_dir={output_dir} already holds {what} ({shown}); use another training.output_dir, "
            f"resume it with training.resume_from_checkpoint=true, "
            f"or replace it with training.overwrite_output_dir=true")
    to_clear = [os.path.join(output_dir, e) for e in entries if _RUN_OUTPUT.match(e)]
    kept = [e for e in entries if not _RUN_OUTPUT.match(e)]
    if kept:
        logger.warning("training.overwrite_output_dir: keeping %s in %s (not written by a run)", kept, output_dir)
    return OutputPlan(output_dir, checkpoint, to_clear, fingerprint)


def claim_output_dir(plan: OutputPlan) -> None:
    """Clear what the new run replaces and record its fingerprint (main process only)."""
    for path in plan.to_clear:
        shutil.rmtree(path) if os.path.isdir(path) and not os.path.islink(path) else os.remove(path)
    if plan.to_clear:
        logger.info("training.overwrite_output_dir: cleared %d entries of the previous run in %s",
                    len(plan.to_clear), plan.output_dir)
    os.makedirs(plan.output_dir, exist_ok=True)
    write_fingerprint(plan.output_dir, plan.fingerprint)


def write_fingerprint(folder: str, fingerprint: dict) -> None:
    with open(os.path.join(folder, RUN_FINGERPRINT_FILE), "w") as f:
        json.dump(fingerprint, f, indent=1, sort_keys=True)


class RecordFingerprintInCheckpoints(TrainerCallback):
    """Writes the run's fingerprint into each checkpoint, so a resume from that checkpoint
    alone (copied elsewhere, or named by path) can still be checked."""

    def __init__(self, fingerprint: dict):
        self.fingerprint = fingerprint

    def on_save(self, args, state, control, **kwargs):
        folder = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        if args.should_save and os.path.isdir(folder):
            write_fingerprint(folder, self.fingerprint)


def _resume_point(output_dir: str, resume: str | bool | None) -> str | None:
    """``resume_from_checkpoint: true`` picks the newest checkpoint in output_dir, if any."""
    if resume in (None, False, "false", "False", ""):
        return None
    if resume in (True, "true", "True"):
        last = get_last_checkpoint(output_dir) if os.path.isdir(output_dir) else None
        if last is None:
            logger.info("training.resume_from_checkpoint: no checkpoint in %s; starting from scratch", output_dir)
        return last
    if not os.path.isdir(resume):
        raise ConfigError(f"training.resume_from_checkpoint={resume}: no such checkpoint folder")
    return resume


def _check_resume(checkpoint: str, fingerprint: dict) -> None:
    saved = _read_fingerprint(checkpoint) or _read_fingerprint(os.path.dirname(os.path.normpath(checkpoint)))
    if saved is None:
        logger.warning("%s has no %s (written before runs recorded one): cannot check that it belongs to "
                       "this config", checkpoint, RUN_FINGERPRINT_FILE)
    else:
        changed = differences(saved, fingerprint)
        if changed:
            raise ConfigError(f"cannot resume from {checkpoint}: it was written by a run with a different config "
                              f"or data: {'; '.join(changed)}. Resume with the same settings, or start a new run "
                              f"(another training.output_dir, or training.overwrite_output_dir=true)")
    state_file = os.path.join(checkpoint, TRAINER_STATE_FILE)
    if os.path.isfile(state_file):
        with open(state_file) as f:
            state = json.load(f)
        step, max_steps = state.get("global_step", 0), state.get("max_steps", 0)
        if max_steps and step >= max_steps:
            raise ConfigError(f"cannot resume from {checkpoint}: it already completed all {max_steps} steps of its "
                              f"run, so 0 would be left to train; its weights are in that folder (and, if the run "
                              f"finished, in its output_dir). To train further, start a new run")


def _read_fingerprint(folder: str) -> dict | None:
    path = os.path.join(folder, RUN_FINGERPRINT_FILE)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def _flatten(tree: dict, prefix: str = "") -> dict:
    """``{"training": {"learning_rate": 1e-4}}`` -> ``{"training.learning_rate": 1e-4}``."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
