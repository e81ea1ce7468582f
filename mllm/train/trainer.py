"""HF Trainer glue: training arguments with a projector learning rate, and a Trainer that
saves and resumes exactly what trains (projectors + peft adapter), never the frozen LLM."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

import torch
from peft import PeftModel, set_peft_model_state_dict
from safetensors.torch import load_file
from transformers import Trainer, TrainingArguments
from transformers.trainer import TRAINING_ARGS_NAME

from mllm.model.multimodal_lm import ADAPTER_DIR, MultimodalLM
from mllm.projectors import load_projector_weights

logger = logging.getLogger(__name__)


@dataclass
class MllmTrainingArguments(TrainingArguments):
    projector_lr: float | None = field(
        default=None, metadata={"help": "Learning rate of the projectors (default: learning_rate)."})
    remove_unused_columns: bool = field(
        default=False, metadata={"help": "Kept False: the model takes media tensors the Trainer can't see."})
    report_to: str | list[str] = field(default="none", metadata={"help": "Integrations to report to."})


class MultimodalTrainer(Trainer):
    def _mllm(self) -> MultimodalLM:
        model = self.accelerator.unwrap_model(self.model) if hasattr(self, "accelerator") else self.model
        return model

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

    def _save(self, output_dir: str | None = None, state_dict=None):
        output_dir = output_dir or self.args.output_dir
        self._mllm().save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        load_trainable_weights(self._mllm(), resume_from_checkpoint)


def load_trainable_weights(model: MultimodalLM, checkpoint_dir: str) -> None:
    """Put a checkpoint's projector and adapter weights into a live model (resume)."""
    load_projector_weights(model.projectors, checkpoint_dir)
    adapter_dir = os.path.join(checkpoint_dir, ADAPTER_DIR)
    if isinstance(model.llm, PeftModel):
        weights = os.path.join(adapter_dir, "adapter_model.safetensors")
        if not os.path.isfile(weights):
            raise FileNotFoundError(f"{checkpoint_dir}: no adapter weights at {weights}")
        result = set_peft_model_state_dict(model.llm, load_file(weights))
        if result.unexpected_keys:
            raise ValueError(f"{weights}: unexpected adapter keys {result.unexpected_keys[:5]}")
    logger.info("loaded trainable weights from %s", checkpoint_dir)
