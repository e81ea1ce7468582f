"""MoraConfig: the peft config of MoRA (Missing-modality low-Rank Adaptation)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Union

from mllm.tuners.registration import extend_peft_type
from mllm.tuners.targeting import TargetedPeftConfig

#: The paper's two branches. A layer belongs to a branch when its module path contains
#: ``<branch layers path>.<index>.`` (see ``pairing.py``).
BRANCHES = ("vision", "text")


@dataclass
class MoraConfig(TargetedPeftConfig):
    """Configuration of a MoRA adapter (paper eqs 2-4).

    Every targeted projection of a paired (vision layer, text layer) gets

        W'^v = a^v W0^v + eta B^v A^v + a^s W0^v + eta S^v^T G^t S^v,   G^t = S^t S^t^T
        W'^t = a^t W0^t + eta B^t A^t + a^s W0^t + eta S^t^T G^v S^t,   G^v = S^v S^v^T

    with modality-specific factors (A, B; rank ``r``), shared factors S^v (shared_r x d_v) and S^t
    (shared_r x d_t) and the learnable scalar magnitudes a^v, a^t (one per layer) and a^s (one per
    pair, common to both branches). eta is ``alpha``, the paper's "low-rank strength" (appendix D).
    """

    r: int = field(default=4, metadata={"help": "Rank of the modality-specific factors A (r x d), B (d x r)."})
    shared_r: int = field(default=4, metadata={
        "help": "Rank of the shared factors S^v, S^t (and size of the Gram matrices)."})
    alpha: float = field(default=1.0, metadata={
        "help": "Low-rank strength eta multiplying both low-rank terms (appendix D; the reference's ALPHA)."})
    dropout: float = field(default=0.1, metadata={"help": "Dropout on the layer input of the low-rank paths."})
    vision_layers: str = field(default="vision_model.encoder.layers", metadata={
        "help": "Module path of the vision branch's layer list (a ModuleList indexed 0..L_v-1)."})
    text_layers: str = field(default="text_model.encoder.layers", metadata={
        "help": "Module path of the text branch's layer list."})
    num_paired_layers: int = field(default=2, metadata={
        "help": "k: pair the last k layers of each branch, matched from the end (towers of different depth "
                "pair up: vision L_v-k+i with text L_t-k+i). Ignored when layer_pairs is given."})
    layer_pairs: Optional[list[list[int]]] = field(default=None, metadata={
        "help": "Explicit [[vision index, text index], ...] pairs (negative indices count from the end)."})
    inner_pairs: Optional[dict[str, str]] = field(default=None, metadata={
        "help": "Projections paired across the towers when their paths inside a layer differ, as "
                "{vision path: text path}, e.g. {'self_attn.out_proj': 'self_attn.o_proj'} for a CLIP tower "
                "paired with a LLaMA-style LLM. Unlisted projections pair with the same path."})
    share_across_projections: bool = field(default=False, metadata={
        "help": "False: one S^v/S^t/a^s per (layer pair, projection), e.g. q with q. True: one per layer pair, "
                "shared by every targeted projection of the two layers (the reference's grouping)."})
    shared_magnitude_init: float = field(default=0.5, metadata={
        "help": "Initial a^s; a^v and a^t start at 1 - a^s so that a^{v/t} W0 + a^s W0 = W0 at initialisation."})
    target_modules: Optional[Union[list[str], str]] = field(default_factory=lambda: ["q_proj", "v_proj"], metadata={
        "help": "Square projections to adapt inside each paired layer (CLIP: q_proj, k_proj, v_proj, out_proj)."})
    bias: str = field(default="none", metadata={"help": "'none' only: MoRA adds no bias."})
    init_weights: bool = field(default=True, metadata={
        "help": "True: the adapted model equals the base model at initialisation (see layer.py). False: random "
                "non-identity factors and magnitudes (tests)."})

    # Capabilities (mllm.tuners): stage 2 pairs an encoder's layers with the LLM's; merging is exact,
    # also into a 4-bit LLM once it is dequantized.
    pairs_with_encoder = True

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = extend_peft_type("mora")
        if self.r <= 0 or self.shared_r <= 0:
            raise ValueError(f"r and shared_r must be positive, got r={self.r}, shared_r={self.shared_r}")
        if self.init_weights and self.r < self.shared_r:
            # The identity initialisation cancels the shared term with the first shared_r specific columns.
            raise ValueError(f"init_weights=True needs r >= shared_r (got r={self.r}, shared_r={self.shared_r})")
        if self.layers_to_transform is not None or self.layers_pattern is not None:
            raise ValueError("MoRA chooses layers by pairing; use num_paired_layers or layer_pairs, "
                             "not layers_to_transform / layers_pattern")
        if self.layer_pairs is not None:
            pairs = [tuple(p) for p in self.layer_pairs]
            if not pairs or any(len(p) != 2 or not all(isinstance(i, int) for i in p) for p in pairs):
                raise ValueError(f"layer_pairs must be a non-empty list of [vision, text] indices, "
                                 f"got {self.layer_pairs}")
            self.layer_pairs = [list(p) for p in pairs]
        elif self.num_paired_layers <= 0:
            raise ValueError(f"num_paired_layers must be positive, got {self.num_paired_layers}")
        if self.inner_pairs is not None:
            if len(set(self.inner_pairs.values())) != len(self.inner_pairs):
                raise ValueError(f"inner_pairs pairs a text projection twice: {self.inner_pairs}")
        if self.vision_layers == self.text_layers:
            raise ValueError("vision_layers and text_layers must name different layer lists")
        if self.bias != "none":
            raise ValueError("MoRA adds no bias; bias must be 'none'")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
