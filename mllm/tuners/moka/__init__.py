"""MokA: Multimodal low-rank Adaptation (modality-specific A, task-centric cross-attention in the
rank space, shared B), registered as the peft method ``moka`` by ``import mllm``."""

from mllm.tuners.moka.config import CROSS_ATTENTION_MODES, MODALITY_NAMES, VARIANTS, MokaConfig
from mllm.tuners.moka.layer import Linear, MokaLayer
from mllm.tuners.moka.model import MokaModel
from mllm.tuners.moka.routing import AdapterLayout, ModalityRouter

__all__ = ["CROSS_ATTENTION_MODES", "MODALITY_NAMES", "VARIANTS", "AdapterLayout", "Linear", "ModalityRouter",
           "MokaConfig", "MokaLayer", "MokaModel"]
