"""MoRA: Missing-modality low-Rank Adaptation (modality-specific factors per branch, shared factors
coupled through Gram matrices, learnable magnitudes), registered as the peft method ``mora`` by
``import mllm``."""

from mllm.tuners.mora.config import BRANCHES, MoraConfig
from mllm.tuners.mora.layer import Linear, MoraLayer, SharedFactors, shared_update
from mllm.tuners.mora.model import MoraModel
from mllm.tuners.mora.pairing import Pairing, Site

__all__ = ["BRANCHES", "Linear", "MoraConfig", "MoraLayer", "MoraModel", "Pairing", "SharedFactors", "Site",
           "shared_update"]
