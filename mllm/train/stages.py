"""The two training stages as library functions; ``stages/*.py`` only parse and call these.

* stage 1 (``run_pretrain``): projectors learn on captioning data; the LLM and encoders are
  frozen; the output folder holds projectors only (plus config and tokenizer).
* stage 2 (``run_instruct``): starts from the stage-1 projectors, adds a peft tuner to the
  LLM, trains both (projectors at ``projector_lr``); the output holds projectors + adapter.
"""

from __future__ import annotations

import logging
import os

import torch
from transformers import set_seed
from transformers.trainer_utils import get_last_checkpoint

from mllm.checkpoint import training_prompt_record
from mllm.config import ConfigError, ExperimentConfig, config_to_dict
from mllm.data.dataset import MultimodalCollator, MultimodalDataset
from mllm.data.mixture import data_file
from mllm.model.multimodal_lm import MultimodalLM
from mllm.train.trainer import MllmTrainingArguments, MultimodalTrainer
from mllm.tuners.delo.sequence import loading_overrides, previous_task_output, start_task

logger = logging.getLogger(__name__)


def training_arguments(cfg: ExperimentConfig) -> MllmTrainingArguments:
    values = dict(cfg.training)
    if not values.get("output_dir"):
        raise ConfigError("training.output_dir is required")
    if values.get("hub_token"):
        raise ConfigError("training.hub_token: keep tokens out of configs (they are saved with the run); "
                          "use HF_TOKEN or `hf auth login`")
    # mllm publishes the final model itself (push_to_hub below), never the Trainer's way.
    if values.pop("push_to_hub", False) and not values.get("hub_model_id"):
        raise ConfigError("training.push_to_hub needs training.hub_model_id (e.g. my-org/my-model)")
    if _uses_deepspeed(values):
        if values.pop("use_cpu", False):  # it would switch DeepSpeed off; DeepSpeed finds the CPU itself
            logger.warning("training.use_cpu is ignored under DeepSpeed")
        if not torch.cuda.is_available():
            # Without CUDA, accelerate picks no backend for DeepSpeed and records a world of 1
            # while DeepSpeed runs on all ranks (wrong batch sizes, unsharded data); gloo fixes it.
            values.setdefault("ddp_backend", "gloo")
    try:
        return MllmTrainingArguments(**values)
    except TypeError as e:
        raise ConfigError(f"training: {e} (fields are those of transformers.TrainingArguments "
                          f"plus projector_lr)") from None


def _uses_deepspeed(training: dict) -> bool:
    """``training.deepspeed`` set, or launched with ``accelerate launch --use_deepspeed``."""
    return bool(training.get("deepspeed")) or os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() in ("1", "true")


def build_dataset(cfg: ExperimentConfig, model: MultimodalLM, path: str, template: str,
                  for_generation: bool = False) -> MultimodalDataset:
    max_length = cfg.data.max_length or getattr(model.base_llm.config.get_text_config(),
                                                "max_position_embeddings", None)
    return MultimodalDataset(
        path, model.tokenizer, model.media_specs(), template=template, system_prompt=cfg.data.system_prompt,
        max_length=max_length, media_root=cfg.data.media_root, on_bad_sample=cfg.data.on_bad_sample,
        for_generation=for_generation)


def _resume_point(args: MllmTrainingArguments) -> str | None:
    """``resume_from_checkpoint: true`` picks the newest checkpoint in output_dir, if any."""
    resume = args.resume_from_checkpoint
    if resume in (None, False, "false", "False"):
        return None
    if resume in (True, "true", "True"):
        last = get_last_checkpoint(args.output_dir) if os.path.isdir(args.output_dir) else None
        if last is None:
            logger.info("no checkpoint in %s; starting from scratch", args.output_dir)
        return last
    return resume


def _train(cfg: ExperimentConfig, args: MllmTrainingArguments, model: MultimodalLM, template: str) -> MultimodalLM:
    if not cfg.data.train:
        raise ConfigError("data.train is required")
    # Native sources and mixtures are written once as LLaVA JSONL under output_dir/data/.
    train_path = data_file(cfg.data.train, args.output_dir, "train", cfg.data.on_bad_sample)
    eval_path = data_file(cfg.data.eval, args.output_dir, "eval", cfg.data.on_bad_sample) if cfg.data.eval else None
    train_dataset = build_dataset(cfg, model, train_path, template)
    model.prompt_record = training_prompt_record(model.tokenizer, template, cfg.data.system_prompt)
    eval_dataset = build_dataset(cfg, model, eval_path, template) if eval_path else None
    trainer = MultimodalTrainer(
        model=model, args=args, train_dataset=train_dataset, eval_dataset=eval_dataset,
        data_collator=MultimodalCollator(model.tokenizer.pad_token_id, padding_side="right"),
    )
    trainer.train(resume_from_checkpoint=_resume_point(args))
    trainer.save_model(args.output_dir)
    trainer.save_state()  # trainer_state.json: the log history (losses, train_runtime) beside the model
    if trainer.is_world_process_zero():
        with open(os.path.join(args.output_dir, "experiment.yaml"), "w") as f:
            import yaml

            yaml.safe_dump(config_to_dict(cfg), f, sort_keys=False)
    if cfg.training.get("push_to_hub") and trainer.is_world_process_zero():
        from mllm.hub import push_checkpoint

        push_checkpoint(args.output_dir, args.hub_model_id, private=args.hub_private_repo, revision=args.hub_revision)
    skipped = sum(train_dataset.skipped.values()) + sum(train_dataset.media_skipped.values())
    if skipped:
        logger.warning("skipped %d bad training sample(s): %s; unreadable media: %s", skipped,
                       dict(train_dataset.skipped), dict(train_dataset.media_skipped))
    return model


def _arguments_and_seed(cfg: ExperimentConfig) -> MllmTrainingArguments:
    """Training arguments first: with ZeRO-3 and ``zero3_init_flag`` they make the LLM load
    partitioned. Seeding before the model is built gives every rank the same projector and
    adapter initialisation (ZeRO-3 assembles parameters from each rank's slice)."""
    args = training_arguments(cfg)
    set_seed(args.seed)
    return args


def run_pretrain(cfg: ExperimentConfig, model: MultimodalLM | None = None) -> MultimodalLM:
    """Stage 1: train projectors only, on captioning data. ``model`` defaults to one built
    from ``cfg.model``."""
    args = _arguments_and_seed(cfg)
    model = model or MultimodalLM.from_config(cfg.model)
    model.freeze_llm()
    template = cfg.data.template if cfg.data.template != "auto" else "plain"
    return _train(cfg, args, model, template)


def run_instruct(cfg: ExperimentConfig, model: MultimodalLM | None = None) -> MultimodalLM:
    """Stage 2: projectors (from stage 1) + a peft tuner inside the LLM. ``model`` defaults
    to one built from ``cfg.model``; the tuner is added here. The stage-1 projectors are loaded
    while the model is built, before DeepSpeed partitions anything (projectors are plain
    modules, never created partitioned).

    DeLo task sequences: ``tuner.task`` is the task this run trains; with ``tuner.continue_from``
    the model, projectors and adapter load (trainable) from the previous task's output instead,
    and the projectors stay frozen (rules in ``mllm.tuners.delo.sequence``)."""
    previous = previous_task_output(cfg)
    if previous is not None and model is not None:
        raise ConfigError("tuner.continue_from: the model loads from that folder; do not pass a model")
    if previous is None and not cfg.model.pretrained_projectors:
        logger.warning("model.pretrained_projectors is not set: stage 2 starts from random projectors")
    elif previous is not None and cfg.model.pretrained_projectors:
        logger.warning("model.pretrained_projectors is ignored: the projectors come from tuner.continue_from")
    args = _arguments_and_seed(cfg)
    if previous is not None:
        model = MultimodalLM.from_pretrained(previous, is_trainable=True, **loading_overrides(cfg))
        model.tuner_config = cfg.tuner
    model = model or MultimodalLM.from_config(cfg.model)
    model.freeze_llm()
    if previous is None and cfg.tuner.type not in (None, "none"):
        model.apply_tuner(cfg.tuner)
    if cfg.tuner.type == "delo":
        start_task(model, cfg.tuner.task, continued=previous is not None)
    return _train(cfg, args, model, cfg.data.template)


STAGES = {"pretrain": run_pretrain, "instruct": run_instruct}

