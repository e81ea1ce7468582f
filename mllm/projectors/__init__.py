"""Per-modality projectors and their stand-alone checkpoint format.

A projector checkpoint is a folder with ``projectors.safetensors`` (keys
``<modality>.<param>``) and ``projectors.json`` (``{modality: ProjectorConfig}``), so stage 1
output loads without the LLM, the encoders or any training state.

Importing this package imports no torch (the config schema names ``ProjectorConfig``, and
``mllm --help`` / scoring answers must start fast); the modules load on first use.
"""

from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING

from mllm.checkpoint import PROJECTOR_CONFIG, PROJECTOR_WEIGHTS
from mllm.errors import UserError
from mllm.projectors.config import ProjectorConfig

if TYPE_CHECKING:
    import torch
    from torch import nn


class ProjectorCheckpointError(UserError):
    pass


def build_projectors(configs: dict[str, ProjectorConfig]) -> nn.ModuleDict:
    from torch import nn

    from mllm.projectors.qformer import QFormerProjector

    return nn.ModuleDict({name: QFormerProjector(cfg) for name, cfg in configs.items()})


def save_projectors(projectors: nn.ModuleDict, output_dir: str,
                    state_dict: dict[str, torch.Tensor] | None = None) -> None:
    """Write the projectors' weights and configs. ``state_dict`` (keys ``<modality>.<param>``)
    overrides the live weights, e.g. with tensors gathered from ZeRO-3 partitions."""
    from safetensors.torch import save_file

    os.makedirs(output_dir, exist_ok=True)
    if state_dict is None:
        state_dict = projectors.state_dict()
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
    save_file(tensors, os.path.join(output_dir, PROJECTOR_WEIGHTS), metadata={"format": "pt"})
    configs = {name: proj.config.to_dict() for name, proj in projectors.items()}
    with open(os.path.join(output_dir, PROJECTOR_CONFIG), "w") as f:
        json.dump(configs, f, indent=2)


def read_projector_configs(checkpoint_dir: str) -> dict[str, ProjectorConfig]:
    path = os.path.join(checkpoint_dir, PROJECTOR_CONFIG)
    if not os.path.isfile(path):
        raise ProjectorCheckpointError(f"{checkpoint_dir}: no {PROJECTOR_CONFIG}; not a projector checkpoint")
    with open(path) as f:
        raw = json.load(f)
    return {name: ProjectorConfig(**cfg) for name, cfg in raw.items()}


def load_projector_weights(projectors: nn.ModuleDict, checkpoint_dir: str) -> None:
    """Load saved weights into existing projectors, refusing any missing, unexpected or
    wrongly shaped tensor with an error that names it. ``checkpoint_dir`` may also name MokA /
    Crab released projector files (a file or a list of files; ``mllm.projectors.released``)."""
    from safetensors.torch import load_file

    from mllm.projectors.released import load_released_projectors, released_files

    files = released_files(checkpoint_dir)
    if files is not None:
        return load_released_projectors(projectors, files)
    path = os.path.join(checkpoint_dir, PROJECTOR_WEIGHTS)
    if not os.path.isfile(path):
        raise ProjectorCheckpointError(f"{checkpoint_dir}: no {PROJECTOR_WEIGHTS}; not a projector checkpoint")
    saved = load_file(path)
    missing, unexpected, misshapen = compare_state(projectors, saved)
    if missing or unexpected:
        raise ProjectorCheckpointError(
            f"{path}: projector keys do not match the model (missing: {missing[:5]}, "
            f"unexpected: {unexpected[:5]}); were these projectors trained for other modalities?")
    if misshapen:
        key, got, want = misshapen[0]
        raise ProjectorCheckpointError(
            f"{path}: '{key}' has shape {got} but the model expects {want}; the checkpoint was made for "
            f"another encoder, LLM or projector size")
    copy_state(projectors, saved)


def compare_state(module: nn.Module, tensors: dict[str, torch.Tensor]):
    """``(missing, unexpected, misshapen)``: parameters with no tensor, tensors with no parameter
    (both sorted), and ``(key, tensor shape, parameter shape)`` for each shape that differs."""
    expected = module.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    misshapen = [(key, tuple(t.shape), tuple(expected[key].shape)) for key, t in tensors.items()
                 if key in expected and t.shape != expected[key].shape]
    return missing, unexpected, misshapen


def copy_state(module: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Copy checked ``tensors`` into ``module``'s parameters and buffers, in their dtypes."""
    import torch

    with torch.no_grad():
        for key, param in module.state_dict(keep_vars=True).items():
            param.copy_(tensors[key].to(param.dtype))


def load_projectors(checkpoint_dir: str) -> nn.ModuleDict:
    projectors = build_projectors(read_projector_configs(checkpoint_dir))
    load_projector_weights(projectors, checkpoint_dir)
    return projectors


def __getattr__(name):
    # The torch modules, on first use (see the module docstring).
    if name in ("MLPProjector", "QFormerProjector"):
        from mllm.projectors import qformer

        return getattr(qformer, name)
    raise AttributeError(f"module 'mllm.projectors' has no attribute {name!r}")


__all__ = [
    "MLPProjector", "ProjectorCheckpointError", "ProjectorConfig", "QFormerProjector", "build_projectors",
    "compare_state", "copy_state", "load_projector_weights", "load_projectors", "read_projector_configs",
    "save_projectors",
]
