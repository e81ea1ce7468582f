"""MokaModel: the peft tuner that injects MokA layers into a model."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Optional

from peft.tuners.tuners_utils import BaseTuner
from torch import nn

from mllm.modality_context import release_tracking_context, tracking_context
from mllm.tuners.moka.config import TARGET_MODULES_BY_MODEL_TYPE, MokaConfig
from mllm.tuners.moka.layer import MERGE_ERROR, Linear, MokaLayer
from mllm.tuners.moka.routing import ModalityRouter


class MokaModel(BaseTuner):
    """Creates MokA adapters (paper eqs 4-13) in a (causal) language model.

    Layers read the per-token modality ids and question mask from the model's ``ModalityContext``
    (DESIGN contract 2). A ``MultimodalLM`` attaches a tracking context to its LLM; a plain model
    gets one here: a forward given ``input_ids`` alone is all text (MokA with one modality is LoRA,
    paper section 3), and a caller with media tokens supplies the ids with
    ``mllm.modality_context.set_modality_ids``. A forward with neither (e.g. only ``inputs_embeds``) raises.

    ``merge_and_unload`` raises: routed A matrices and the cross-attention do not fold into one
    weight. ``unload`` (drop the adapter) works.
    """

    prefix: str = "moka_"
    tuner_layer_cls = MokaLayer
    target_module_mapping = TARGET_MODULES_BY_MODEL_TYPE

    def _prepare_adapter_config(self, peft_config: MokaConfig, model_config: dict) -> MokaConfig:
        if peft_config.target_modules is None:
            targets = self.target_module_mapping.get(model_config.get("model_type"))
            # Unknown family: every Linear except the output layer (peft expands "all-linear").
            peft_config.target_modules = set(targets) if targets else "all-linear"
        return peft_config

    @property
    def router(self) -> ModalityRouter:
        # Created lazily: peft's injection hooks do not run for add_adapter / load_adapter.
        router = self.__dict__.get("_moka_router")
        if router is None:
            router = self.__dict__["_moka_router"] = ModalityRouter(tracking_context(self.model))
        return router

    def _create_and_replace(self, peft_config: MokaConfig, adapter_name: str, target: nn.Module,
                            target_name: str, parent: nn.Module, current_key: str, **kwargs) -> None:
        if isinstance(target, MokaLayer):
            target.update_layer(adapter_name, peft_config, inference_mode=peft_config.inference_mode)
            return
        if not isinstance(target, nn.Linear):
            raise TypeError(f"MokA adapts nn.Linear layers; {current_key} is a {type(target).__name__}. "
                            "Choose target_modules that name Linear layers.")
        new_module = Linear(target, adapter_name, peft_config, router=self.router)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)

    def _check_new_adapter_config(self, config: MokaConfig) -> None:
        super()._check_new_adapter_config(config)
        if config.bias != "none":
            raise ValueError("MokA adds no bias; bias must be 'none'")

    def _check_merge_allowed(self):
        raise NotImplementedError(MERGE_ERROR)

    def unload(self) -> nn.Module:
        # The returned base model must not keep the modality-tracking hook we gave it.
        if self.__dict__.pop("_moka_router", None) is not None:
            release_tracking_context(self.model)
        return super().unload()

    # -- partial-modality inference (paper section 4.3, figures 1 and 5) ----------------------------
    def set_partial_modality(self, modality: Optional[str]) -> None:
        """On the prompt pass ("the first generation", section 4.3), let only ``modality``'s tokens
        through the adapter path (None: all tokens); cross-modal interaction is off meanwhile, as
        in the paper's evaluation of MokA w/o cross-attention. KV-cache decode steps
        (``ModalityContext.decode_step``) are not affected: generated tokens take the text A as
        usual. Every forward without a filled KV cache counts as a prompt pass."""
        from mllm.modality import modality_from_name

        self.router.partial_modality = None if modality is None else modality_from_name(modality).name.lower()

    @contextmanager
    def partial_modality(self, modality: str) -> Iterator[None]:
        previous = self.router.partial_modality
        self.set_partial_modality(modality)
        try:
            yield
        finally:
            self.router.partial_modality = previous
