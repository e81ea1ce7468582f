"""DeloConfig: the peft config of DeLo (dual decomposed low-rank experts for continual
missing-modality learning)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from mllm.tuners.registration import extend_peft_type
from mllm.tuners.targeting import TargetedPeftConfig

#: Default targets per model family. ViLT: every layer's attention query/key/value, as the DeLo
#: reference does; decoder LLMs: the same three projections under their names.
TARGET_MODULES_BY_MODEL_TYPE = {
    "vilt": ["query", "key", "value"],
    **{model_type: ["q_proj", "k_proj", "v_proj"]
       for model_type in ("llama", "mistral", "qwen2", "qwen3", "qwen2_5_vl_text", "qwen2_vl_text", "gemma",
                          "gemma2", "gemma3_text", "phi3")},
}


@dataclass
class DeloConfig(TargetedPeftConfig):
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
    task: int = field(default=0, metadata={"help": "The task this run trains (0-based, below num_tasks); task k > 0 "
                                                   "continues from task k-1's adapter."})
    query_cache: bool = field(
        default=True, metadata={"help": "Keep each training sample's frozen query features and skip the query pass "
                                        "when the sample comes again (mllm.tuners.delo.query_cache; off by itself "
                                        "where it cannot apply, e.g. while the projectors train)."})
    query_cache_max_mib: float = field(
        default=4096.0, metadata={"help": "CPU memory the query cache may fill (MiB; 16 KiB a sample for a 4096-wide "
                                          "bf16 LLM, so 4 GiB hold about 260K samples). Once full it keeps what it "
                                          "holds and later samples run the query pass."})
    query_dim: Optional[int] = field(
        default=None, metadata={"help": "Width of the query signals; default the backbone's hidden_size."})
    bias: str = field(default="none", metadata={"help": "'none' only: DeLo adds no bias."})
    init_weights: bool = field(
        default=True, metadata={"help": "True: b_e zero (identity at start). False: b_e random too (tests)."})

    # Capabilities (mllm.tuners): per-sample expert selection folds into no weight; one pool set per task;
    # the prompt pass's per-sample routing holds for the decode steps (DeloModel._before_forward).
    mergeable = False
    partitions_tasks = True
    per_sample_decode_state = True
    merge_refusal = ("DeLo's router mixes low-rank experts per sample (and picks the task by its key memory), "
                     "so its update folds into no single weight")

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = extend_peft_type("delo")
        if not 0 < self.r <= self.num_experts:
            raise ValueError(f"need 0 < r <= num_experts, got r={self.r}, num_experts={self.num_experts}")
        if self.num_tasks <= 0:
            raise ValueError(f"num_tasks must be positive, got {self.num_tasks}")
        if isinstance(self.task, bool) or not isinstance(self.task, int) or not 0 <= self.task < self.num_tasks:
            raise ValueError(f"task={self.task!r} is out of range for num_tasks={self.num_tasks} "
                             f"(tasks 0..{self.num_tasks - 1})")
        if self.query_cache_max_mib < 0:
            raise ValueError(f"query_cache_max_mib must be at least 0, got {self.query_cache_max_mib}")
        if self.bias != "none":
            raise ValueError("DeLo adds no bias; bias must be 'none'")

    #: Fields that belong to one training run, not to the adapter: a run that continues a saved
    #: adapter takes them from its own config (mllm.train.continuation).
    RUN_FIELDS = ("task", "query_cache", "query_cache_max_mib")
    #: Fields the continuing run's adapter must share with the saved one.
    _CONTINUATION_FIELDS = ("num_tasks", "num_experts", "r", "alpha", "query_dim")

    def check_continuation(self, previous: "DeloConfig | None") -> None:
        """Whether this config may train on top of ``previous`` (the saved adapter; None: a new
        adapter). Task k > 0 needs task k-1's adapter, with the same pool sizes."""
        if previous is None:
            if self.task > 0:
                raise ValueError(f"task={self.task} needs the adapter of task {self.task - 1}: set "
                                 f"model.continue_from to that run's stage-2 output")
            return
        for name in self._CONTINUATION_FIELDS:
            if getattr(self, name) != getattr(previous, name):
                raise ValueError(f"{name}={getattr(self, name)!r} differs from the previous adapter's "
                                 f"{name}={getattr(previous, name)!r}")
