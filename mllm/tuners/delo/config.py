"""DeloConfig: the peft config of DeLo (dual decomposed low-rank experts for continual
missing-modality learning)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Union

from peft.config import PeftConfig

#: Default targets per model family. ViLT: every layer's attention query/key/value, as the DeLo
#: reference does; decoder LLMs: the same three projections under their names.
TARGET_MODULES_BY_MODEL_TYPE = {
    "vilt": ["query", "key", "value"],
    **{model_type: ["q_proj", "k_proj", "v_proj"]
       for model_type in ("llama", "mistral", "qwen2", "qwen3", "qwen2_5_vl_text", "qwen2_vl_text", "gemma",
                          "gemma2", "gemma3_text", "phi3")},
}


@dataclass
class DeloConfig(PeftConfig):
    """Configuration of a DeLo adapter.

    Tasks are *pools inside one adapter* (``num_tasks`` of them), not separate named adapters: the
    Task-Key Memory must choose a task per sample at inference, so every task's pools have to be
    live in the same forward. Task partitioning is done with ``requires_grad`` per task
    (``DeloModel.set_task``), which keeps earlier tasks bit-for-bit unchanged.

    Per adapted Linear, task k and modality m in {visual, text}: a pool of ``num_experts`` rank-one
    factor pairs (a_e in R^in, b_e in R^out) and a router R (num_experts x query_dim). For each
    sample the top-``r`` factors by router score are summed: Delta W = sum_i b_i a_i^T (figure 3b),
    visual part plus text part; the output is W0 x + (alpha / r) Delta W x.
    """

    r: int = field(default=4, metadata={"help": "Rank-one factors selected per sample and modality."})
    num_experts: int = field(default=16, metadata={"help": "Factor pairs in each task's pool (E)."})
    alpha: float = field(default=2.0, metadata={"help": "Scaling is alpha / r (reference: LORA_ALPHA 2.0)."})
    dropout: float = field(default=0.0, metadata={"help": "Dropout on the layer input of the low-rank path."})
    num_tasks: int = field(default=1, metadata={"help": "Tasks of the continual sequence (one pool set each)."})
    query_dim: Optional[int] = field(
        default=None, metadata={"help": "Width of the query signals; default the backbone's hidden_size."})
    target_modules: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "Module names or regex; default per model family, else 'all-linear'."})
    exclude_modules: Optional[Union[list[str], str]] = field(default=None)
    layers_to_transform: Optional[Union[list[int], int]] = field(default=None)
    layers_pattern: Optional[Union[list[str], str]] = field(default=None)
    modules_to_save: Optional[list[str]] = field(default=None)
    target_parameters: Optional[list[str]] = field(default=None)  # read by peft's target matching
    bias: str = field(default="none", metadata={"help": "'none' only: DeLo adds no bias."})
    init_weights: bool = field(
        default=True, metadata={"help": "True: b_e zero (identity at start). False: b_e random too (tests)."})

    def __post_init__(self):
        super().__post_init__()
        from mllm.tuners.registration import delo_peft_type

        self.peft_type = delo_peft_type()
        if isinstance(self.target_modules, list):
            self.target_modules = set(self.target_modules)
        if isinstance(self.exclude_modules, list):
            self.exclude_modules = set(self.exclude_modules)
        if not 0 < self.r <= self.num_experts:
            raise ValueError(f"need 0 < r <= num_experts, got r={self.r}, num_experts={self.num_experts}")
        if self.num_tasks <= 0:
            raise ValueError(f"num_tasks must be positive, got {self.num_tasks}")
        if self.bias != "none":
            raise ValueError("DeLo adds no bias; bias must be 'none'")
