"""The classification stage's baselines that add no adapter (MoRA's table 4): BitFit (biases
only), full fine-tuning, and the frozen backbone (the head alone trains). No peft config class."""

from __future__ import annotations

from torch import nn

from mllm.tuners import CLIP, register_tuner


def _train_only(backbone: nn.Module, trains) -> nn.Module:
    for name, param in backbone.named_parameters():
        param.requires_grad_(trains(name))
    return backbone


@register_tuner("bitfit", None, backbone=CLIP)
def bitfit(clip: nn.Module, options: dict) -> nn.Module:
    """BitFit: every bias of the backbone trains, nothing else."""
    return _train_only(clip, lambda name: name.endswith(".bias"))


@register_tuner("full", None, backbone=CLIP)
def full_fine_tuning(clip: nn.Module, options: dict) -> nn.Module:
    """Full fine-tuning: every backbone parameter trains."""
    return _train_only(clip, lambda name: True)


@register_tuner("frozen", None, backbone=CLIP)
def frozen(clip: nn.Module, options: dict) -> nn.Module:
    """Frozen backbone: only the classifier head trains."""
    return _train_only(clip, lambda name: False)
