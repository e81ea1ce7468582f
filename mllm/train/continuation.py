"""Continue training from a previous stage-2 output (``model.continue_from``): the next task of a
task sequence (DeLo), or more training of the same adapter.

The model, the projectors and the whole adapter load from that output, trainable. Rules that keep
what the previous run learned exactly as it was:

* the run's own ``model`` section may change only how the saved model is loaded and run (LLM path,
  dtype, quantization, attention, feature cache); encoders and projectors are the saved ones;
* the projectors stay frozen: they feed everything the previous runs trained (stage 2 trains
  them in the first run only);
* the adapter's config must agree with the saved one where the tuner says so
  (``check_continuation`` on its peft config, e.g. DeLo's pool sizes), and the tuner's per-run
  fields (``RUN_FIELDS``, e.g. DeLo's ``task``) are taken from this run's config;
* what trains is the tuner's business (``begin_training`` on its peft model, e.g. DeLo trains
  only the current task's pools).
"""

from __future__ import annotations

import logging
import os

from mllm.checkpoint import ADAPTER_DIR, MLLM_CONFIG
from mllm.config import ConfigError, ExperimentConfig

logger = logging.getLogger(__name__)

#: Model-section fields that say how to load and run the saved model, not what it is; a continued
#: run takes them from its own config (the rest comes from the previous output).
LOADING_FIELDS = ("llm", "dtype", "quantization", "attn_implementation", "trust_remote_code", "feature_cache")


def previous_output(cfg: ExperimentConfig) -> str | None:
    """The folder ``model.continue_from`` names, checked (None when the run starts a new adapter).
    ConfigError naming the field: not a stage-2 output, another tuner type, an adapter the tuner
    says cannot be continued with this config, or an output folder equal to the previous one."""
    from peft import PeftConfig

    from mllm.hub import resolve_checkpoint
    from mllm.tuners import tuner_config_class

    config_class = tuner_config_class(cfg.tuner.type) if cfg.tuner.type not in (None, "none") else None
    check = getattr(config_class, "check_continuation", None)
    wanted = _wanted_config(cfg) if check is not None else None
    if not cfg.model.continue_from:
        if wanted is not None:
            _tuner_rule(wanted.check_continuation, None, "")
        return None
    where = f"model.continue_from={cfg.model.continue_from!r}"
    if config_class is None:
        raise ConfigError(f"{where}: continuing needs the tuner the previous output trained, not tuner.type: none")
    try:
        folder = resolve_checkpoint(cfg.model.continue_from)
    except (OSError, ValueError) as e:
        raise ConfigError(f"{where}: {e}") from None
    adapter_dir = os.path.join(folder, ADAPTER_DIR)
    if not os.path.isfile(os.path.join(folder, MLLM_CONFIG)) or not os.path.isdir(adapter_dir):
        raise ConfigError(f"{where}: not a stage-2 output (no {MLLM_CONFIG} or {ADAPTER_DIR}/); give the "
                          f"previous run's stage-2 output folder")
    saved = PeftConfig.from_pretrained(adapter_dir)
    if type(saved) is not config_class:
        kind = getattr(saved.peft_type, "value", saved.peft_type)
        raise ConfigError(f"{where}: its adapter is {kind}, not {cfg.tuner.type}; a continued run keeps the "
                          f"previous run's tuner")
    if wanted is not None:
        _tuner_rule(wanted.check_continuation, saved, f" ({where})")
    output_dir = cfg.training.get("output_dir")
    if output_dir and os.path.realpath(output_dir) == os.path.realpath(folder):
        raise ConfigError(f"training.output_dir is the previous run's output ({where}); write to a new folder")
    return folder


def _wanted_config(cfg: ExperimentConfig):
    """This run's peft config, built only for tuners with per-run rules (its own checks named)."""
    from mllm.tuners import build_peft_config

    try:
        return build_peft_config(cfg.tuner)
    except (TypeError, ValueError) as e:   # the peft config's own checks, e.g. DeLo's task range
        raise ConfigError(f"tuner: {e}") from None


def _tuner_rule(check, saved, where: str) -> None:
    try:
        check(saved)
    except ValueError as e:
        raise ConfigError(f"tuner: {e}{where}") from None


def load_previous(cfg: ExperimentConfig, folder: str):
    """The previous output as a trainable ``MultimodalLM``: its projectors frozen, the tuner's
    per-run fields from this run's config."""
    from mllm.model.multimodal_lm import MultimodalLM
    from mllm.tuners import tuner_config_class

    overrides = {name: getattr(cfg.model, name) for name in LOADING_FIELDS}
    if not overrides["llm"]:
        del overrides["llm"]          # not given: the LLM the previous output names
    model = MultimodalLM.from_pretrained(folder, is_trainable=True, **overrides)
    model.tuner_config = cfg.tuner
    run_fields = getattr(tuner_config_class(cfg.tuner.type), "RUN_FIELDS", ())
    wanted = _wanted_config(cfg) if run_fields else None
    for live in model.llm.peft_config.values():
        for name in run_fields:
            setattr(live, name, getattr(wanted, name))
    model.projectors.requires_grad_(False)
    return model


def begin_training(model) -> None:
    """Let the tuner decide what trains in this run (e.g. DeLo: the current task only)."""
    begin = getattr(getattr(model.llm, "base_model", None), "begin_training", None)
    if begin is not None:
        begin()
