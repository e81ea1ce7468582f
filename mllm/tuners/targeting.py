"""The fields peft's target matching reads (``BaseTuner.inject_adapter``), shared by the project's
tuner configs so that each config declares only its own method's fields."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Union

from peft.config import PeftConfig


@dataclass
class TargetedPeftConfig(PeftConfig):
    target_modules: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "Module names or regex; default per model family, else 'all-linear'."})
    exclude_modules: Optional[Union[list[str], str]] = field(default=None)
    layers_to_transform: Optional[Union[list[int], int]] = field(default=None)
    layers_pattern: Optional[Union[list[str], str]] = field(default=None)
    modules_to_save: Optional[list[str]] = field(default=None)
    target_parameters: Optional[list[str]] = field(default=None)  # read by peft's target matching

    def __post_init__(self):
        super().__post_init__()
        # peft matches names against sets (as LoraConfig stores them).
        if isinstance(self.target_modules, list):
            self.target_modules = set(self.target_modules)
        if isinstance(self.exclude_modules, list):
            self.exclude_modules = set(self.exclude_modules)
