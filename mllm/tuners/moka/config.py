"""MokaConfig: the peft config of MokA (Multimodal low-rank Adaptation) and its ablation variants."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from mllm.tuners.registration import extend_peft_type
from mllm.tuners.targeting import TargetedPeftConfig

#: The modality names a MokA adapter can route (``mllm.modality.Modality`` without PAD).
MODALITY_NAMES = ("text", "visual", "audio", "speech")

#: ``variant``: how the low-rank path is structured.
#:   moka             - one A per modality, one shared B, cross-modal interaction (paper eqs 4-13)
#:   unimodal_lora    - baseline "Uni-modal LoRA": A and B per modality, no interaction
#:   multiple_lora    - baseline "Multiple LoRA": ``num_loras`` LoRAs over every token, summed
#:   uni_mm_lora      - baseline "Uni LoRA + MM LoRA": per-modality LoRA + one shared LoRA, summed
#:   uni_mm_lora_gate - the same two branches mixed by a per-token sigmoid gate
VARIANTS = ("moka", "unimodal_lora", "multiple_lora", "uni_mm_lora", "uni_mm_lora_gate")

#: ``cross_attention`` (``variant="moka"`` only): the cross-modal interaction in the rank space.
#:   task_centric - the paper's: non-text tokens query the question-text tokens (eqs 5-8)
#:   none         - ablation "MokA w/o CA" (table 5)
#:   text_queries - ablation "cross-attention*": question-text tokens query the non-text tokens (table 4)
#:   naive        - ablation "naive interaction": uniform mean of the question tokens (table 4)
#:   projected    - appendix B: task_centric with linear query/key/value projections (eqs 16-17)
CROSS_ATTENTION_MODES = ("task_centric", "none", "text_queries", "naive", "projected")

#: Default targets per model family: every attention and MLP projection of the decoder, as the
#: paper does (q, k, v, o, gate, up, down). Other families fall back to peft's "all-linear".
TARGET_MODULES_BY_MODEL_TYPE = {
    model_type: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    for model_type in ("llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe",
                       "qwen2_5_vl_text", "qwen2_vl_text", "gemma", "gemma2", "gemma3_text", "phi3")
}


@dataclass
class MokaConfig(TargetedPeftConfig):
    """Configuration of a MokA adapter.

    The rank space has dimension ``r``; B is (out, r) and the scaling is ``alpha / r``. A modality
    given a smaller rank in ``modality_ranks`` uses the first ``modality_ranks[m]`` coordinates of the
    rank space (its A has that many rows), so it still shares B and can attend to text.
    """

    r: int = field(default=8, metadata={"help": "Rank of the shared rank space (B has r columns)."})
    alpha: float = field(default=16, metadata={"help": "Scaling is alpha / r, as in LoRA."})
    dropout: float = field(default=0.0, metadata={"help": "Dropout on the layer input of the low-rank path."})
    modalities: list[str] = field(
        default_factory=lambda: list(MODALITY_NAMES),
        metadata={"help": "Modalities that get their own A (must include 'text'). A token of another "
                          "modality is an error."})
    modality_ranks: Optional[dict[str, int]] = field(
        default=None, metadata={"help": "Rank per modality (<= r); missing modalities use r."})
    variant: str = field(default="moka", metadata={"help": f"One of {VARIANTS}."})
    cross_attention: str = field(default="task_centric", metadata={"help": f"One of {CROSS_ATTENTION_MODES}."})
    strengths: dict[str, float] = field(
        default_factory=lambda: {"visual": 1.0, "audio": 1.0, "speech": 1.0, "text": 1.0},
        metadata={"help": "Cross-modal strength lambda per query modality (eqs 7-8); 'text' is used only "
                          "by cross_attention='text_queries'."})
    num_loras: Optional[int] = field(
        default=None, metadata={"help": "variant='multiple_lora': number of LoRAs (default: len(modalities))."})
    bias: str = field(default="none", metadata={"help": "'none' only: MokA adds no bias."})
    init_weights: bool = field(
        default=True, metadata={"help": "True: A Kaiming-uniform, B zero (identity at start). False: B random "
                                        "too (tests)."})

    # Capabilities (mllm.tuners): routed A matrices and the cross-attention fold into no weight.
    mergeable = False
    merge_refusal = ("MokA routes each token through its own modality's A matrix and a task-centric "
                     "cross-attention, so its update differs per token and folds into no single weight")

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = extend_peft_type("moka")
        self.modalities = [str(m).lower() for m in self.modalities]
        unknown = set(self.modalities) - set(MODALITY_NAMES)
        if unknown or len(set(self.modalities)) != len(self.modalities):
            raise ValueError(f"modalities must be distinct names from {MODALITY_NAMES}, got {self.modalities}")
        if "text" not in self.modalities:
            raise ValueError("modalities must include 'text' (decode steps and questions are text)")
        if self.variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {self.variant!r}")
        if self.cross_attention not in CROSS_ATTENTION_MODES:
            raise ValueError(f"cross_attention must be one of {CROSS_ATTENTION_MODES}, got {self.cross_attention!r}")
        if self.variant != "moka" and self.cross_attention not in ("none", "task_centric"):
            raise ValueError(f"cross_attention={self.cross_attention!r} needs variant='moka'")
        if self.r <= 0:
            raise ValueError(f"r must be positive, got {self.r}")
        for name, rank in (self.modality_ranks or {}).items():
            if name not in self.modalities:
                raise ValueError(f"modality_ranks names {name!r}, which is not in modalities {self.modalities}")
            if not 0 < rank <= self.r:
                raise ValueError(f"modality_ranks[{name!r}] = {rank} must be in 1..r (r={self.r})")
        if self.bias != "none":
            raise ValueError("MokA adds no bias; bias must be 'none'")
        if self.num_loras is not None and self.num_loras <= 0:
            raise ValueError(f"num_loras must be positive, got {self.num_loras}")

    # -- derived -------------------------------------------------------------------------------
    def rank_of(self, modality: str) -> int:
        return (self.modality_ranks or {}).get(modality, self.r)
