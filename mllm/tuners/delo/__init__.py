"""DeLo: dual decomposed low-rank experts for continual missing-modality learning (rank-one factor
pools per task and modality, cross-modal guided routing, task partitioning, Task-Key Memory),
registered as the peft method ``delo`` when this package is imported."""

from mllm.tuners.delo.config import DeloConfig
from mllm.tuners.delo.layer import DeloLayer, Linear, TaskPools
from mllm.tuners.delo.model import DeloModel, TaskQueries, task_parameter_names
from mllm.tuners.delo.state import COMPLETE, IMAGE_MISSING, TEXT_MISSING, DeloState

__all__ = ["COMPLETE", "IMAGE_MISSING", "TEXT_MISSING", "DeloConfig", "DeloLayer", "DeloModel", "DeloState",
           "Linear", "TaskPools", "TaskQueries", "task_parameter_names"]


# -- registration: the peft method and the stage-2 entry (tuner.type: delo) ------------------------------
from mllm.tuners import VILT, register_tuner  # noqa: E402
from mllm.tuners.registration import register_peft_method  # noqa: E402

register_peft_method("delo", DeloConfig, DeloModel)


@register_tuner("delo", DeloConfig)
def delo_config(cfg) -> DeloConfig:
    """DeLo; tuner.options: num_experts, num_tasks, task, query_dim; task k > 0: model.continue_from=<task k-1>.

    ``tuner.r`` is the number of rank-one factors selected per sample and modality. Inside an LLM
    the caller (or a ``MultimodalLM``'s modality context) supplies per-token modality ids; see
    ``DeloModel``. ``query_cache`` (default true) reuses each training sample's frozen query
    features from its second epoch (``mllm.tuners.delo.query_cache``)."""
    fields = {"r": cfg.r, "alpha": cfg.alpha, "dropout": cfg.dropout, **cfg.options}
    if cfg.target_modules is not None:
        fields["target_modules"] = cfg.target_modules
    return DeloConfig(**fields)


@register_tuner("delo", DeloConfig, backbone=VILT)
def delo_on_vilt(vilt, options: dict):
    """DeLo on ViLT (the CMML stage); options: any DeloConfig field, num_tasks given by the stage."""
    from peft import get_peft_model

    return get_peft_model(vilt, DeloConfig(**options))
