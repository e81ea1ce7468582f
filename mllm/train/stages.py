"""The two training stages as library functions; ``stages/*.py`` only parse and call these.

* stage 1 (``run_pretrain``): projectors learn on captioning data; the LLM and encoders are
  frozen; the output folder holds projectors only (plus config and tokenizer).
* stage 2 (``run_instruct``): starts from the stage-1 projectors, adds a peft tuner to the
  LLM, trains both (projectors at ``projector_lr``); the output holds projectors + adapter.
"""

from __future__ import annotations

import logging
import os
import typing

import torch
from peft import PeftModel
from transformers import set_seed

from mllm.checkpoint import EXPERIMENT_FILE, training_prompt_record
from mllm.config import ConfigError, ExperimentConfig, check_local_paths, check_value, config_to_dict
from mllm.data.check import DataReport, check_data, media_fields_for
from mllm.data.dataset import MultimodalCollator, MultimodalDataset
from mllm.data.lazy import LazyMultimodalDataset
from mllm.data.mixture import data_file
from mllm.distributed import full_numel
from mllm.model.multimodal_lm import MultimodalLM
from mllm.train.continuation import begin_training, load_previous, previous_output
from mllm.train.run_folder import OutputPlan, RecordFingerprintInCheckpoints, check_output_dir, claim_output_dir
from mllm.train.trainer import MllmTrainingArguments, MultimodalTrainer

logger = logging.getLogger(__name__)


def checked_training_values(cfg: ExperimentConfig) -> dict:
    """``cfg.training`` with each value checked against its TrainingArguments field type (and
    numbers written as strings made numbers, YAML's ``no`` made "no"); errors name field and file."""
    hints = typing.get_type_hints(MllmTrainingArguments)
    values = {}
    for name, value in cfg.training.items():
        # resume_from_checkpoint also takes true (the newest checkpoint): mllm reads it itself.
        if name in hints and name != "resume_from_checkpoint":
            try:
                value = check_value(f"training.{name}", value, hints[name])
            except ConfigError as e:
                raise ConfigError(f"{cfg.source}: {e}" if cfg.source else str(e)) from None
        values[name] = value
    return values


def training_arguments(cfg: ExperimentConfig) -> MllmTrainingArguments:
    values = checked_training_values(cfg)
    cfg.training.update(values)  # saved with the run (experiment.yaml) as read
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
                          f"plus projector_lr and overwrite_output_dir)") from None
    except ValueError as e:  # TrainingArguments' own consistency checks
        raise ConfigError(f"training: {' '.join(str(e).split())}") from None


def _uses_deepspeed(training: dict) -> bool:
    """``training.deepspeed`` set, or launched with ``accelerate launch --use_deepspeed``."""
    return bool(training.get("deepspeed")) or os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() in ("1", "true")


def reads_lazily(cfg: ExperimentConfig, split: str) -> bool:
    """Whether ``data.<split>`` is read lazily: ``data.lazy``, except a packed training file, whose
    rows are fitted to each sample's exact length (so it is tokenised up front)."""
    return cfg.data.lazy and not (cfg.data.packing and split == "train")


def build_dataset(cfg: ExperimentConfig, model: MultimodalLM, path: str, template: str,
                  for_generation: bool = False, report: DataReport | None = None) -> MultimodalDataset:
    max_length = cfg.data.max_length or getattr(model.base_llm.config.get_text_config(),
                                                "max_position_embeddings", None)
    lazy = report.index is not None if report is not None else cfg.data.lazy   # as the pre-flight read it
    dataset_class = LazyMultimodalDataset if lazy else MultimodalDataset
    return dataset_class(
        path, model.tokenizer, model.media_specs(), template=template, system_prompt=cfg.data.system_prompt,
        max_length=max_length, media_root=cfg.data.media_root, on_bad_sample=cfg.data.on_bad_sample,
        for_generation=for_generation, report=report)


class Preflight(typing.NamedTuple):
    """What the checks before any model loads found: the output folder plan and the data."""

    output: OutputPlan
    paths: dict[str, str]         # "train" / "eval" -> the LLaVA-format file to read
    data: dict[str, DataReport]   # "train" / "eval" -> report


def preflight(cfg: ExperimentConfig, args: MllmTrainingArguments, media_fields: set[str] | None) -> Preflight:
    """Every check that needs no model, so a bad path, folder or record stops the run in seconds
    (not when its batch is drawn hours later): local paths, the output folder, every record."""
    check_local_paths(cfg)
    if not cfg.data.train:
        raise ConfigError("data.train is required")
    output = check_output_dir(cfg, args.output_dir, args.resume_from_checkpoint, args.overwrite_output_dir)
    paths, reports = {}, {}
    for name in ("train", "eval"):
        value = getattr(cfg.data, name)
        if value:
            # Native sources and mixtures are written once as LLaVA JSONL under output_dir/data/.
            paths[name] = data_file(value, args.output_dir, name, cfg.data.on_bad_sample)
            reports[name] = check_data(paths[name], media_root=cfg.data.media_root, media_fields=media_fields,
                                       on_bad_sample=cfg.data.on_bad_sample, index=reads_lazily(cfg, name))
            logger.info("data.%s %s", name, reports[name].summary())
    if output.resume_from:
        logger.info("resuming from %s", output.resume_from)
    return Preflight(output, paths, reports)


def _encoder_fields(cfg: ExperimentConfig) -> set[str] | None:
    """Record fields the model takes: its encoders' and a native VLM backbone's own (image, video)."""
    from mllm.model.native import native_media_fields

    fields = (media_fields_for(cfg.model.encoders) if cfg.model.encoders else set()) | native_media_fields(cfg.model)
    return fields or None


def _train(cfg: ExperimentConfig, args: MllmTrainingArguments, model: MultimodalLM, template: str,
           checked: Preflight) -> MultimodalLM:
    train_dataset = build_dataset(cfg, model, checked.paths["train"], template, report=checked.data["train"])
    model.prompt_record = training_prompt_record(model.tokenizer, template, cfg.data.system_prompt)
    eval_dataset = (build_dataset(cfg, model, checked.paths["eval"], template, report=checked.data["eval"])
                    if "eval" in checked.paths else None)
    collator = MultimodalCollator(model.tokenizer.pad_token_id, padding_side="right")
    if cfg.data.packing:
        train_dataset, collator = packed_training_data(cfg, args, model, train_dataset)
    trainer = MultimodalTrainer(model=model, args=args, train_dataset=train_dataset, eval_dataset=eval_dataset,
                                data_collator=collator)
    trainer.add_callback(RecordFingerprintInCheckpoints(checked.output.fingerprint))
    trainer.accelerator.wait_for_everyone()  # every rank has checked the folder before it changes
    if trainer.is_world_process_zero():
        claim_output_dir(checked.output)
    trainer.train(resume_from_checkpoint=checked.output.resume_from)
    trainer.save_model(args.output_dir)
    trainer.save_state()  # trainer_state.json: the log history (losses, train_runtime) beside the model
    if trainer.is_world_process_zero():
        with open(os.path.join(args.output_dir, EXPERIMENT_FILE), "w") as f:
            import yaml

            yaml.safe_dump(config_to_dict(cfg), f, sort_keys=False)
    if cfg.training.get("push_to_hub") and trainer.is_world_process_zero():
        from mllm.hub import push_checkpoint

        push_checkpoint(args.output_dir, args.hub_model_id, private=args.hub_private_repo, revision=args.hub_revision)
    if train_dataset.num_skipped:
        logger.warning("skipped %d bad training record(s), each once: %s; unreadable media: %s",
                       train_dataset.num_skipped, dict(train_dataset.skipped), dict(train_dataset.media_skipped))
    if trainer.is_world_process_zero():
        logger.info("saved to %s: %s", args.output_dir, describe_saved(model))
    return model


def packed_training_data(cfg: ExperimentConfig, args: MllmTrainingArguments, model: MultimodalLM,
                         dataset: MultimodalDataset):
    """``data.packing``: the training samples packed into rows (``mllm.data.packing``), packed
    within each modality mix when batches are grouped by it, and the collator that lays them out."""
    from mllm.data.packing import PackedCollator, PackedDataset
    from mllm.model.native import NativeVisionLM

    if isinstance(model, NativeVisionLM):
        raise ConfigError("data.packing: a native vision-language backbone (its own position ids and vision "
                          "tokens) does not take packed rows; turn data.packing off")
    capacity = cfg.data.packed_length or cfg.data.max_length or getattr(
        model.base_llm.config.get_text_config(), "max_position_embeddings", None)
    if not capacity:
        raise ConfigError("data.packing needs data.packed_length (tokens per packed row)")
    packed = PackedDataset(dataset, capacity, seed=args.seed, by_mix=args.group_by_modality_length)
    logger.info("data.packing: %d samples in %d rows of up to %d tokens", len(dataset), len(packed), capacity)
    return packed, PackedCollator(model.tokenizer.pad_token_id)


def describe_saved(model: MultimodalLM) -> str:
    """What a stage's output folder holds, in words."""
    parts = [f"projectors ({', '.join(model.projectors.keys())})" if len(model.projectors) else "no projectors"]
    if isinstance(model.llm, PeftModel):
        config = model.llm.peft_config[model.llm.active_adapter]
        rank = f", r={config.r}" if getattr(config, "r", None) else ""
        peft_type = str(getattr(config.peft_type, "value", config.peft_type)).lower()
        trained = sum(full_numel(p) for p in model.llm.parameters() if p.requires_grad)   # ZeRO-3: partitioned
        parts.append(f"a {peft_type} adapter in adapter/ ({trained:,} trained parameters{rank})")
    parts.append(f"the config and tokenizer; the LLM ({model.base_llm.config.name_or_path}) and the encoders "
                 f"are referenced, not copied")
    return ", ".join(parts)


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
    checked = preflight(cfg, args, _encoder_fields(cfg))
    if cfg.model.pretrained_projectors:
        logger.info("projectors: from model.pretrained_projectors=%s", cfg.model.pretrained_projectors)
    model = model or MultimodalLM.from_config(cfg.model)
    model.freeze_llm()
    template = cfg.data.template if cfg.data.template != "auto" else "plain"
    return _train(cfg, args, model, template, checked)


def run_instruct(cfg: ExperimentConfig, model: MultimodalLM | None = None) -> MultimodalLM:
    """Stage 2: projectors (from stage 1) + a peft tuner inside the LLM. ``model`` defaults
    to one built from ``cfg.model``; the tuner is added here. The stage-1 projectors are loaded
    while the model is built, before DeepSpeed partitions anything (projectors are plain
    modules, never created partitioned).

    With ``model.continue_from`` the model, projectors and adapter load (trainable) from a previous
    stage-2 output instead and the projectors stay frozen (``mllm.train.continuation``: the next
    task of a DeLo task sequence). The tuner decides what trains (``begin_training``)."""
    previous = previous_output(cfg)
    if previous is not None and model is not None:
        raise ConfigError("model.continue_from: the model loads from that folder; do not pass a model")
    if previous is None and not cfg.model.pretrained_projectors:
        logger.warning("model.pretrained_projectors is not set: stage 2 starts from random projectors")
    elif previous is not None and cfg.model.pretrained_projectors:
        logger.warning("model.pretrained_projectors is ignored: the projectors come from model.continue_from")
    args = _arguments_and_seed(cfg)
    checked = preflight(cfg, args, _encoder_fields(cfg) if previous is None else None)
    if previous is not None:
        logger.info("model, projectors and adapter: from model.continue_from=%s", previous)
        model = load_previous(cfg, previous)   # adapter trainable, LLM and projectors frozen
    else:
        if cfg.model.pretrained_projectors:
            logger.info("projectors: from model.pretrained_projectors=%s", cfg.model.pretrained_projectors)
        model = model or MultimodalLM.from_config(cfg.model)
        model.freeze_llm()
        if cfg.tuner.type not in (None, "none"):
            logger.info("adapter: a new %s adapter (r=%s)", cfg.tuner.type, cfg.tuner.r)
            model.apply_tuner(cfg.tuner)
    begin_training(model)
    return _train(cfg, args, model, cfg.data.template, checked)


STAGES = {"pretrain": run_pretrain, "instruct": run_instruct}

