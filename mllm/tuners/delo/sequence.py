"""Stage 2 across a sequence of instruction-tuning tasks with DeLo (``tuner.task``,
``tuner.continue_from``; ``mllm.train.stages.run_instruct`` calls these).

Task 0 is an ordinary stage-2 run that creates the adapter with ``options.num_tasks`` pool sets;
task k > 0 continues from task k-1's stage-2 output. Rules that keep every earlier task
bit-for-bit what it was:

* the model, the projectors and the whole adapter load from the previous output (the model
  section's loading fields -- LLM path, dtype, quantization, attention, feature cache -- may
  change; encoders and projectors are the saved ones, earlier tasks depend on them);
* only task k's pools, routers and query maps train (``DeloModel.set_task``);
* the projectors stay frozen in every run that continues from a previous output: they feed every
  task, so training them would change what the earlier tasks compute (stage 2 trains them in
  task 0 only);
* the Task-Key Memory accumulates task k's keys only; earlier tasks' keys and counts are kept.
"""

from __future__ import annotations

import logging
import os

from mllm.config import ConfigError, ExperimentConfig

logger = logging.getLogger(__name__)

#: Model-section fields that say how to load and run the saved model, not what it is; a continued
#: run takes them from its own config (the rest comes from the previous output).
LOADING_FIELDS = ("llm", "dtype", "quantization", "attn_implementation", "trust_remote_code", "feature_cache")

#: Adapter fields that must match the previous output's, with the config field that sets each.
_MATCHING_FIELDS = {"num_tasks": "tuner.options.num_tasks", "num_experts": "tuner.options.num_experts",
                    "r": "tuner.r", "alpha": "tuner.alpha", "query_dim": "tuner.options.query_dim"}


def previous_task_output(cfg: ExperimentConfig) -> str | None:
    """Check ``tuner.task`` / ``tuner.continue_from`` and return the previous task's output folder
    (None when the run starts a new adapter). ConfigError naming the field for a task index out
    of range, task > 0 without a previous output, or a previous output that is not a DeLo stage-2
    output with the same ``num_tasks`` (and pool sizes)."""
    from peft import PeftConfig

    from mllm.hub import resolve_checkpoint
    from mllm.model.multimodal_lm import ADAPTER_DIR, MLLM_CONFIG
    from mllm.tuners import build_peft_config
    from mllm.tuners.delo.config import DeloConfig

    tuner = cfg.tuner
    tuner.check_task()   # the fields alone (they may have been set after the config was read)
    if tuner.type != "delo":
        return None
    wanted = build_peft_config(tuner)
    if not tuner.continue_from:
        tuner.check_task(wanted.num_tasks)
        return None
    where = f"tuner.continue_from={tuner.continue_from!r}"
    try:
        folder = resolve_checkpoint(tuner.continue_from)
    except (OSError, ValueError) as e:
        raise ConfigError(f"{where}: {e}") from None
    adapter_dir = os.path.join(folder, ADAPTER_DIR)
    if not os.path.isfile(os.path.join(folder, MLLM_CONFIG)) or not os.path.isdir(adapter_dir):
        raise ConfigError(f"{where}: not a stage-2 output (no {MLLM_CONFIG} or {ADAPTER_DIR}/); give the "
                          f"previous task's stage-2 output folder")
    saved = PeftConfig.from_pretrained(adapter_dir)
    if not isinstance(saved, DeloConfig):
        raise ConfigError(f"{where}: its adapter is {getattr(saved.peft_type, 'value', saved.peft_type)}, not delo; a task sequence continues "
                          f"a DeLo adapter")
    for name, field in _MATCHING_FIELDS.items():
        if getattr(wanted, name) != getattr(saved, name):
            raise ConfigError(f"{field}={getattr(wanted, name)!r} differs from the previous adapter's "
                              f"{name}={getattr(saved, name)!r} ({where})")
    tuner.check_task(saved.num_tasks)
    output_dir = cfg.training.get("output_dir")
    if output_dir and os.path.realpath(output_dir) == os.path.realpath(folder):
        raise ConfigError(f"training.output_dir is the previous task's output ({where}); write task "
                          f"{tuner.task} to a new folder")
    return folder


def loading_overrides(cfg: ExperimentConfig) -> dict:
    """``MultimodalLM.from_pretrained`` overrides from the run's own model section."""
    values = {name: getattr(cfg.model, name) for name in LOADING_FIELDS}
    if not values["llm"]:
        del values["llm"]          # not given: the LLM the previous output names
    return values


def start_task(model, task: int, continued: bool) -> None:
    """Make task ``task`` the one that trains in ``model`` (a MultimodalLM with a DeLo adapter,
    LLM frozen): its pools, routers and query maps only; projectors frozen when ``continued``."""
    tuner = model.llm.base_model
    tuner.set_task(task)
    if not continued:
        return
    model.projectors.requires_grad_(False)
    for name, queries in tuner.delo_query.items():
        counts = queries.counts.sum(-1)
        untrained = [t for t in range(task) if counts[t] == 0]
        if untrained:
            logger.warning("adapter %r has no Task-Key Memory for earlier task(s) %s: was each trained "
                           "before task %d?", name, untrained, task)
        if counts[task] > 0:
            logger.warning("adapter %r already holds task %d's keys; this run adds to them", name, task)
