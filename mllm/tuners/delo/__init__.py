"""DeLo: dual decomposed low-rank experts for continual missing-modality learning (rank-one factor
pools per task and modality, cross-modal guided routing, task partitioning, Task-Key Memory),
registered as the peft method ``delo`` by ``import mllm``."""

from mllm.tuners.delo.config import DeloConfig
from mllm.tuners.delo.layer import DeloLayer, Linear, TaskPools
from mllm.tuners.delo.model import DeloModel, TaskQueries, task_parameter_names
from mllm.tuners.delo.state import COMPLETE, IMAGE_MISSING, TEXT_MISSING, DeloState

__all__ = ["COMPLETE", "IMAGE_MISSING", "TEXT_MISSING", "DeloConfig", "DeloLayer", "DeloModel", "DeloState",
           "Linear", "TaskPools", "TaskQueries", "task_parameter_names"]
