"""MoRA: Missing-modality low-Rank Adaptation (modality-specific factors per branch, shared factors
coupled through Gram matrices, learnable magnitudes), registered as the peft method ``mora`` when this
package is imported."""

from mllm.tuners.mora.config import BRANCHES, MoraConfig
from mllm.tuners.mora.layer import Linear, MoraLayer, SharedFactors, shared_update
from mllm.tuners.mora.model import MoraModel
from mllm.tuners.mora.pairing import Pairing, Site

__all__ = ["BRANCHES", "Linear", "MoraConfig", "MoraLayer", "MoraModel", "Pairing", "SharedFactors", "Site",
           "shared_update"]


# -- registration: the peft method and the stage-2 entry (tuner.type: mora) ------------------------------
from mllm.tuners import CLIP, register_tuner  # noqa: E402
from mllm.tuners.registration import register_peft_method  # noqa: E402

register_peft_method("mora", MoraConfig, MoraModel)


@register_tuner("mora", MoraConfig)
def mora_config(cfg) -> MoraConfig:
    """MoRA; tuner.options: pair_encoder (stage 2), num_paired_layers, shared_r, alpha (eta), inner_pairs.

    For a two-tower model (vision and text layer lists); in stage 2 ``MultimodalLM.apply_tuner``
    pairs ``options.pair_encoder``'s layers with the LLM's. ``alpha`` in ``options`` is the
    low-rank strength eta (LoRA's ``tuner.alpha`` means something else and is not passed on);
    ``layer_pairs``, ``vision_layers``, ``text_layers`` set the pairing by hand."""
    fields = {"r": cfg.r, "dropout": cfg.dropout, **cfg.options}
    if cfg.target_modules is not None:
        fields["target_modules"] = cfg.target_modules
    return MoraConfig(**fields)


@register_tuner("mora", MoraConfig, backbone=CLIP)
def mora_on_clip(clip, options: dict):
    """MoRA on CLIP's two towers; options: any MoraConfig field (r, shared_r, alpha, num_paired_layers, ...)."""
    from peft import get_peft_model

    return get_peft_model(clip, MoraConfig(**options))
