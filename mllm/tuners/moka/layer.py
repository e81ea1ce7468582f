"""The MokA-adapted Linear (paper eqs 4-13).

For a frozen W0 and a token x_t of modality m(t) (eq 13):

    h_t = W0 x_t + s * B (A_{m(t)} x_t + delta_t),     s = alpha / r

where delta_t = lambda_{m(t)} * Attn(A_{m(t)} x_t, A_text X_Q, A_text X_Q) for a non-text token
(eqs 5-8; X_Q = the question-text tokens of the same sample, softmax over keys with 1/sqrt(r)
temperature, no extra projections) and delta_t = 0 for a text token (the 0_t of eq 12). Pad tokens
get no adapter output.

All modality A matrices live in one parameter ``moka_A[adapter]`` of shape (sum of ranks, in),
rows grouped by modality in ``config.modalities`` order, so one matmul computes every modality's
projection and a gather keeps the token's own block (no boolean indexing, no loop over samples or
tokens). The cross-modal term attends each sample's question tokens, gathered into a compact
(B, Nk, r) key set, so its cost is (B, T, Nk), not (B, T, T). All index tensors come from the
router, computed once per forward of the model and shared by every layer. Dropout is applied to
the layer input, as LoRA does. The base layer runs on the tokens flattened to (N, in), and
s * B(...) is added to its fresh (N, out) output in place, in one addmm_ (a Linear keeps its
input, not its output, for backward; a quantization backend's ``maybe_clone_base_result`` runs
first). When every token is text (KV-cache decode steps, text-only batches) the layer is plain
LoRA with A_text: two matmuls, no routing tensors.

Deviations from the reference implementation (moka_reference.md), all following the paper:
the scaling s multiplies B's output (LoRA's convention; the AVT code scales before attention),
keys are the masked question tokens (not a contiguous first-to-last slice), and routing comes from
the published modality ids, not from the sequence length.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch
import torch.nn.functional as F
from peft.tuners.tuners_utils import BaseTunerLayer, _get_in_out_features
from peft.utils import resolve_quantization_backend
from torch import nn

from mllm.tuners.moka.routing import AdapterLayout, Interaction, ModalityRouter, Routes

MERGE_ERROR = (
    "MokA cannot be merged into the base weights: each token is projected by its own modality's A "
    "and non-text tokens attend to the question tokens, so the update is not one weight matrix. "
    "Keep the adapter unmerged (or call unload() to drop it)."
)


class MokaLayer(BaseTunerLayer):
    # Trainable containers keyed by adapter name (every name carries the "moka_" prefix).
    adapter_layer_names = ("moka_A", "moka_B", "moka_gate", "moka_query", "moka_key", "moka_value")
    other_param_names = ("r", "scaling", "moka_dropout", "moka_layout")

    def __init__(self, base_layer: nn.Module, router: ModalityRouter, **kwargs) -> None:
        self.base_layer = base_layer
        self.quantization_backend = resolve_quantization_backend(self.get_base_layer())
        self.r: dict[str, int] = {}
        self.scaling: dict[str, float] = {}
        self.moka_layout: dict[str, AdapterLayout] = {}
        self.moka_dropout = nn.ModuleDict({})
        self.moka_A = nn.ParameterDict({})       # (rows, in): modality blocks [+ multimodal LoRA]
        self.moka_B = nn.ParameterDict({})       # (out, r) shared, or (out, rows) for per-block B
        self.moka_gate = nn.ParameterDict({})    # (1, in)  variant uni_mm_lora_gate
        self.moka_query = nn.ParameterDict({})   # (non-text modalities, r, r)  cross_attention=projected
        self.moka_key = nn.ParameterDict({})     # (r, r)
        self.moka_value = nn.ParameterDict({})   # (r, r)
        self._disable_adapters = False
        self.merged_adapters = []
        in_features, out_features = _get_in_out_features(self.get_base_layer())
        if in_features is None or out_features is None:
            raise TypeError(f"MokA supports Linear layers, not {type(self.get_base_layer()).__name__}")
        self.in_features, self.out_features = in_features, out_features
        # A plain reference (not a submodule): one router serves every layer of the model.
        self.router = router
        self.kwargs = kwargs

    def update_layer(self, adapter_name: str, config, inference_mode: bool = False, **kwargs) -> None:
        layout = AdapterLayout.from_config(config)
        self.r[adapter_name] = config.r
        self.scaling[adapter_name] = config.alpha / config.r
        self.moka_layout[adapter_name] = layout
        self.moka_dropout[adapter_name] = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.moka_A[adapter_name] = nn.Parameter(torch.empty(layout.a_rows, self.in_features))
        self.moka_B[adapter_name] = nn.Parameter(torch.empty(self.out_features, layout.b_cols))
        if layout.variant == "uni_mm_lora_gate":
            self.moka_gate[adapter_name] = nn.Parameter(torch.empty(1, self.in_features))
        if layout.cross_attention == "projected":
            r = layout.r
            self.moka_query[adapter_name] = nn.Parameter(torch.empty(len(layout.nontext_slots), r, r))
            self.moka_key[adapter_name] = nn.Parameter(torch.empty(r, r))
            self.moka_value[adapter_name] = nn.Parameter(torch.empty(r, r))
        self.reset_moka_parameters(adapter_name, config.init_weights)
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=inference_mode)

    @torch.no_grad()
    def reset_moka_parameters(self, adapter_name: str, init_weights: bool = True) -> None:
        # A: Kaiming-uniform as LoRA (the bound depends on fan_in only, so initialising the stacked
        # parameter equals initialising each modality's A separately). B: zero -> identity at start.
        nn.init.kaiming_uniform_(self.moka_A[adapter_name], a=math.sqrt(5))
        if init_weights:
            nn.init.zeros_(self.moka_B[adapter_name])
        else:
            nn.init.normal_(self.moka_B[adapter_name], std=0.1)  # tests: a non-identity adapter
        if adapter_name in self.moka_gate:
            # The paper gives no gate formula; zero weights start as an even 0.5 / 0.5 mix.
            nn.init.zeros_(self.moka_gate[adapter_name])
        if adapter_name in self.moka_query:
            # Appendix B does not say how W_q, W_k, W_v start; identity starts at plain MokA.
            for name in ("moka_query", "moka_key", "moka_value"):
                param = getattr(self, name)[adapter_name]
                param.copy_(torch.eye(param.shape[-1]).expand_as(param))


class Linear(nn.Module, MokaLayer):
    """A frozen Linear plus the MokA low-rank path."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, config, router: ModalityRouter, **kwargs) -> None:
        super().__init__()
        MokaLayer.__init__(self, base_layer, router, **kwargs)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config, inference_mode=config.inference_mode)

    # -- merging ------------------------------------------------------------------------------------
    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        raise NotImplementedError(MERGE_ERROR)

    def unmerge(self) -> None:
        raise NotImplementedError(MERGE_ERROR)

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        raise NotImplementedError(MERGE_ERROR)

    # -- forward --------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        moka_A = self.moka_A
        active = [] if self.disable_adapters else [name for name in self.active_adapters if name in moka_A]
        if not active:
            return self.base_layer(x, *args, **kwargs)
        # The base layer runs on the tokens flattened to (N, in): its output is a fresh (N, out)
        # tensor that nothing else holds (a Linear saves its input, not its output, for backward),
        # so the adapter output is added to it in place, fused into the B matmul.
        result = self.base_layer(x.reshape(-1, x.shape[-1]), *args, **kwargs)
        if self.quantization_backend is not None:
            result = self.quantization_backend.maybe_clone_base_result(result)
        # (batch, tokens, features); a 2-D input (batch, features) is a batch of one-token sequences,
        # with modality ids of shape (batch, 1).
        tokens = x if x.dim() > 2 else x.unsqueeze(1)
        for name in active:
            weight_A = moka_A[name]
            layout = self.moka_layout[name]
            routes = self.router.routes(layout, weight_A.dtype, weight_A.device)
            if routes.shape != tokens.shape[:2]:
                raise RuntimeError(f"published modality ids {routes.shape} do not match this forward's tokens "
                                   f"{tuple(tokens.shape[:2])}; set them for every forward (set_modality_ids)")
            h = tokens if tokens.dtype == weight_A.dtype else self._cast_input_dtype(tokens, weight_A.dtype)
            dropout = self.moka_dropout[name]
            if not isinstance(dropout, nn.Identity):
                h = dropout(h)
            codes, weight_B = self._low_rank_codes(name, layout, weight_A, h, routes)
            result = _add_scaled_product(result, codes, weight_B, self.scaling[name])
        return result.view(*x.shape[:-1], result.shape[-1])

    def _low_rank_codes(self, name: str, layout: AdapterLayout, weight_A: torch.Tensor, h: torch.Tensor,
                        routes: Routes) -> tuple[torch.Tensor, torch.Tensor]:
        """The routed rank-space codes and the B matrix they meet: the adapter output is
        s * codes @ B^T (B and the scaling s are applied by the caller, in one fused op)."""
        weight_B = self.moka_B[name]
        if routes.text_only:
            # Every token is text (decode steps, text-only batches) and the variant is moka or
            # unimodal_lora: exactly LoRA with A_text (and its B columns).
            columns = layout.text_b_columns
            return F.linear(h, weight_A[layout.text_block]), (weight_B if columns is None else weight_B[:, columns])
        codes = F.linear(h, weight_A)                               # every block's A x_t
        if layout.variant != "moka":
            weights = routes.column_weights
            if layout.variant == "uni_mm_lora_gate":
                # Gate g_t in (0, 1) mixes the uni-modal (g) and the multimodal (1 - g) branch.
                gate = torch.sigmoid(F.linear(h, self.moka_gate[name]))
                uni = layout.modality_rank_total
                weights = weights * torch.cat([gate.expand(*gate.shape[:-1], uni),
                                               (1 - gate).expand(*gate.shape[:-1], layout.r)], dim=-1)
            return codes * weights, weight_B
        # Eq 4: A_{m(t)} x_t for each token, in the shared rank space (pads and coordinates past a
        # smaller modality rank are zeroed by the mask).
        codes = torch.gather(codes, -1, routes.rank_columns)
        if routes.rank_mask is not None:
            codes = codes * routes.rank_mask
        if routes.interaction is not None:
            codes = self._add_interaction(name, layout, codes, routes.interaction)
        return codes, weight_B                                     # eq 10: the shared B

    def _add_interaction(self, name: str, layout: AdapterLayout, codes: torch.Tensor,
                         interaction: Interaction) -> torch.Tensor:
        """codes + lambda * (the cross-modal term) (eqs 7-8 and the ablation variants)."""
        keys = torch.gather(codes, 1, interaction.key_index)       # (B, Nk, r) each sample's key codes
        mode = layout.cross_attention
        if mode == "naive":
            # Uniform mapping: every query receives the mean code of its sample's question tokens.
            term = interaction.key_mean @ keys
        elif mode == "projected":
            # Appendix B, eqs 16-17: W_q per query modality, W_k and W_v on the text keys.
            batch, length, r = codes.shape
            per_modality = F.linear(codes, self.moka_query[name].reshape(-1, r)).view(batch, length, -1, r)
            queries = (per_modality * interaction.query_modality.unsqueeze(-1)).sum(-2)
            term = _attention(queries, F.linear(keys, self.moka_key[name]), F.linear(keys, self.moka_value[name]),
                              interaction.key_bias)
        else:
            # task_centric (eqs 5-6) and text_queries: the codes are queries, keys and values.
            term = _attention(codes, keys, keys, interaction.key_bias)
        return torch.addcmul(codes, interaction.strength, term)

    def __repr__(self) -> str:
        return "moka." + super().__repr__()


def _add_scaled_product(result: torch.Tensor, codes: torch.Tensor, weight_B: torch.Tensor,
                        scaling: float) -> torch.Tensor:
    """result += scaling * codes @ B^T, in place on the base output ``result`` (N, out).

    When the adapter and the base output share a dtype this is one addmm_ (the product, the
    scaling and the sum in one kernel; in backward the sum passes the gradient through).
    Otherwise (e.g. fp32 adapters on a bf16 model) the product is computed in the adapter's dtype
    and added in it, rounded to the base dtype once, as LoRA's ``result + delta`` followed by the
    cast back does.
    """
    codes = codes.reshape(-1, codes.shape[-1])
    if result.dtype == codes.dtype == weight_B.dtype:
        return result.addmm_(codes, weight_B.t(), alpha=scaling)
    return result.add_(torch.mm(codes, weight_B.t()), alpha=scaling)


def _scores(query: torch.Tensor, key: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """q k^T / sqrt(r) (+ bias) for (B, T, r) queries and (B, Nk, r) keys: (B, T, Nk)."""
    scale = 1.0 / math.sqrt(query.shape[-1])
    if bias is None:
        return torch.bmm(query, key.transpose(1, 2)).mul_(scale)   # bmm saves its inputs, not its output
    return torch.baddbmm(bias, query, key.transpose(1, 2), alpha=scale)


def _attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               bias: Optional[torch.Tensor]) -> torch.Tensor:
    """softmax(q k^T / sqrt(r) + bias) v for (B, T, r) queries and (B, Nk, r) keys and values;
    ``bias`` (B, 1, Nk), or (B, T, Nk) in packed rows, masks key slots a query may not see (None: none).

    Written out rather than scaled_dot_product_attention: at rank-sized heads (r ~ 4..16) the
    three batched matmul/softmax kernels are cheaper than the fused kernel's set-up, in both
    directions. Half-precision scores are normalised in float32.
    """
    scores = _scores(query, key, bias)
    if scores.dtype in (torch.float16, torch.bfloat16):
        return torch.bmm(scores.softmax(-1, dtype=torch.float32).to(value.dtype), value)
    return torch.bmm(scores.softmax(-1), value)
