"""MokA: Multimodal low-rank Adaptation (modality-specific A, task-centric cross-attention in the
rank space, shared B), registered as the peft method ``moka`` when this package is imported."""

from mllm.tuners.moka.config import CROSS_ATTENTION_MODES, MODALITY_NAMES, VARIANTS, MokaConfig
from mllm.tuners.moka.layer import Linear, MokaLayer
from mllm.tuners.moka.model import MokaModel
from mllm.tuners.moka.routing import AdapterLayout, ModalityRouter

__all__ = ["CROSS_ATTENTION_MODES", "MODALITY_NAMES", "VARIANTS", "AdapterLayout", "Linear", "ModalityRouter",
           "MokaConfig", "MokaLayer", "MokaModel"]


# -- registration: the peft method and the stage-2 entry (tuner.type: moka) ------------------------------
from mllm.tuners import register_tuner  # noqa: E402
from mllm.tuners.registration import register_peft_method  # noqa: E402

register_peft_method("moka", MokaConfig, MokaModel)


@register_tuner("moka", MokaConfig)
def moka_config(cfg) -> MokaConfig:
    """MokA; tuner.options: modalities, modality_ranks, strengths, cross_attention, variant, num_loras.

    ``options`` holds the method's own fields."""
    return MokaConfig(
        r=cfg.r,
        alpha=cfg.alpha,
        dropout=cfg.dropout,
        target_modules=cfg.target_modules,   # None: the family's attention + MLP projections
        task_type="CAUSAL_LM",
        **cfg.options,
    )
