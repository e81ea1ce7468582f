"""HF Trainer glue: training arguments with a projector learning rate, and a Trainer that
saves and resumes exactly what trains (projectors + peft adapter), never the frozen LLM.

Under DeepSpeed the Trainer's own machinery does the rest: the engine checkpoint
(``global_step*/``) carries optimizer and module state for resuming, and ZeRO-3 partitions
are gathered here, on every rank, before the main process writes projectors and adapter.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

import torch
from peft import PeftModel, set_peft_model_state_dict
from safetensors.torch import load_file
from transformers import Trainer, TrainingArguments
from transformers.trainer import TRAINING_ARGS_NAME

from mllm.checkpoint import ADAPTER_DIR, ADAPTER_WEIGHTS
from mllm.distributed import gathered_parameters
from mllm.model.multimodal_lm import MultimodalLM
from mllm.projectors import load_projector_weights

logger = logging.getLogger(__name__)


@dataclass
class MllmTrainingArguments(TrainingArguments):
    projector_lr: float | None = field(
        default=None, metadata={"help": "Learning rate of the projectors (default: learning_rate)."})
    remove_unused_columns: bool = field(
        default=False, metadata={"help": "Kept False: the model takes media tensors the Trainer can't see."})
    report_to: str | list[str] = field(default="none", metadata={"help": "Integrations to report to."})
    group_by_modality_length: bool = field(
        default=False, metadata={"help": "Batches of one modality mix and similar length, in random batch order "
                                         "(LLaVA's option; mllm.data.sampler). Deterministic under the seed and "
                                         "resumable."})
    overwrite_output_dir: bool = field(
        default=False, metadata={"help": "Let a new run replace the run already in output_dir (its checkpoints "
                                         "and outputs are cleared first); without it such a run refuses."})


class MultimodalTrainer(Trainer):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.is_deepspeed_enabled:
            _fill_hidden_size_autos(self.accelerator.state.deepspeed_plugin.hf_ds_config,
                                    self._mllm().base_llm.config.get_text_config().hidden_size)

    def _mllm(self) -> MultimodalLM:
        model = self.accelerator.unwrap_model(self.model) if hasattr(self, "accelerator") else self.model
        return model

    def _get_train_sampler(self, train_dataset=None):
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        if not self.args.group_by_modality_length or not hasattr(dataset, "lengths_and_mixes"):
            return super()._get_train_sampler(train_dataset)
        from mllm.data.sampler import ModalityLengthGroupedSampler

        lengths, mixes = dataset.lengths_and_mixes()
        return ModalityLengthGroupedSampler(lengths, mixes, self.args.per_device_train_batch_size *
                                            max(1, self.args.world_size), seed=self.args.seed)

    def create_optimizer(self, model=None):
        if self.optimizer is not None:
            return self.optimizer
        mllm = self._mllm()
        projector_ids = {id(p) for p in mllm.projector_parameters()}
        trainable = [(n, p) for n, p in mllm.named_parameters() if p.requires_grad]
        if not trainable:
            raise ValueError("nothing to train: every parameter is frozen")
        decay = self.get_decay_parameter_names(mllm)
        projector_lr = self.args.projector_lr or self.args.learning_rate
        groups = []
        for is_projector, lr in ((True, projector_lr), (False, self.args.learning_rate)):
            for use_decay in (True, False):
                params = [p for n, p in trainable
                          if (id(p) in projector_ids) == is_projector and (n in decay) == use_decay]
                if params:
                    groups.append({"params": params, "lr": lr,
                                   "weight_decay": self.args.weight_decay if use_decay else 0.0})
        optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, mllm)
        optimizer_kwargs.pop("lr", None)
        self.optimizer = optimizer_cls(groups, **optimizer_kwargs)
        return self.optimizer

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False):
        """Every rank gathers the trainable weights (a collective under ZeRO-3); the main
        process writes them. Replaces the Trainer's DeepSpeed path, which would gather the
        whole frozen LLM too."""
        self._save(output_dir, state_dict=trainable_state_dict(self._mllm()))

    def _save(self, output_dir: str | None = None, state_dict=None):
        if not self.args.should_save:
            return
        output_dir = output_dir or self.args.output_dir
        model = self._mllm()
        if state_dict is None:  # only reached without ZeRO-3 partitioning
            state_dict = trainable_state_dict(model)
        # A native backbone's trained connector (mllm.model.native), gathered with the rest.
        connector = _strip(state_dict, CONNECTOR_PREFIX)
        model.save_pretrained(output_dir, projector_state=_strip(state_dict, "projectors."),
                              adapter_state=_strip(state_dict, "llm."),
                              **({"connector_state": connector} if connector else {}))
        torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        load_trainable_weights(self._mllm(), resume_from_checkpoint)


def trainable_state_dict(model: MultimodalLM) -> dict[str, torch.Tensor]:
    """Projector and adapter tensors (keys as in ``model.state_dict()``), and a native backbone's
    trained connector (keys ``native_connector.*``), as full CPU copies.

    Under ZeRO-3 these parameters are partitioned (0-sized on each rank); they are gathered
    here, so every rank must call this. Only the trainable parts are gathered, never the LLM."""
    adapter_prefix = model.llm.base_model.prefix if isinstance(model.llm, PeftModel) else None
    entries = {name: value for name, value in model.state_dict(keep_vars=True).items()
               if name.startswith("projectors.")
               or (adapter_prefix and name.startswith("llm.") and adapter_prefix in name)}
    if getattr(model, "connector_is_saved", lambda: False)():
        entries.update({CONNECTOR_PREFIX + name: value for name, value in model.connector_parameters().items()})
    with gathered_parameters(entries.values()):
        return {name: value.detach().to("cpu", copy=True) for name, value in entries.items()}


#: Key prefix of the native connector's tensors in ``trainable_state_dict`` (its own names follow).
CONNECTOR_PREFIX = "native_connector."


def _strip(state_dict: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}


def _fill_hidden_size_autos(ds_config, hidden_size: int) -> None:
    """DeepSpeed's hidden-size "auto" values, with the formulas transformers uses. transformers
    reads ``model.config.hidden_size``; ours is the LLM's, so they are filled here first."""
    ds_config.fill_only("zero_optimization.reduce_bucket_size", hidden_size * hidden_size)
    if ds_config.is_zero3():
        ds_config.fill_only("zero_optimization.stage3_prefetch_bucket_size", int(0.9 * hidden_size * hidden_size))
        ds_config.fill_only("zero_optimization.stage3_param_persistence_threshold", 10 * hidden_size)


def load_trainable_weights(model: MultimodalLM, checkpoint_dir: str) -> None:
    """Put a checkpoint's projector and adapter weights (and a native backbone's trained
    connector) into a live model (resume)."""
    load_projector_weights(model.projectors, checkpoint_dir)
    if hasattr(model, "load_connector"):
        model.load_connector(checkpoint_dir)
    adapter_dir = os.path.join(checkpoint_dir, ADAPTER_DIR)
    if isinstance(model.llm, PeftModel):
        weights = os.path.join(adapter_dir, ADAPTER_WEIGHTS)
        if not os.path.isfile(weights):
            raise FileNotFoundError(f"{checkpoint_dir}: no adapter weights at {weights}")
        result = set_peft_model_state_dict(model.llm, load_file(weights))
        if result.unexpected_keys:
            raise ValueError(f"{weights}: unexpected adapter keys {result.unexpected_keys[:5]}")
    logger.info("loaded trainable weights from %s", checkpoint_dir)
