"""The DeLo-adapted Linear: dual decomposed low-rank experts (figures 2-3).

For a frozen W0, a sample routed to task k and any token x of that sample:

    y = W0 x + (alpha / r) * (Delta W^v + Delta W^t) x,
    Delta W^m = sum_{i in top_r(R^m_k q^m)} b^m_{k,i} a^m_{k,i}^T          (figure 3b)

The visual and textual parts are added on every token (the reference applies both adapters to all
tokens; the paper's figure 2 sums them into one Delta W_k). q^m is the sample's query signal for
modality m after cross-modal guided routing (``DeloState``).

Selection is a hard top-r; to let the router learn, each selected factor is multiplied by a
straight-through gate ``1 + s - s.detach()`` with s = sigmoid(score): its value is exactly 1 (so the
update is exactly the sum of outer products of the selected factors) while the gradient reaches
the router. The paper gives no router gradient rule; this is our choice.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch
from peft.tuners.tuners_utils import BaseTunerLayer, _get_in_out_features
from peft.utils import resolve_quantization_backend
from torch import nn

from mllm.tuners.delo.packing import per_row, slot_columns
from mllm.tuners.delo.state import DeloState

MODALITIES = ("visual", "text")

MERGE_ERROR = (
    "DeLo cannot be merged into the base weights: every sample selects its own rank-one factors "
    "(and its own task), so the update is not one weight matrix. Keep the adapter unmerged."
)


class TaskPools(nn.Module):
    """One adapter's factor pools and routers in one layer, a separate Parameter per task and
    modality so that a task is frozen by ``requires_grad`` alone (task partitioning, figure 2)."""

    def __init__(self, num_tasks: int, num_experts: int, in_features: int, out_features: int, query_dim: int):
        super().__init__()
        shapes = {"a": (num_experts, in_features), "b": (num_experts, out_features),
                  "router": (num_experts, query_dim)}
        for kind, shape in shapes.items():
            for modality in MODALITIES:
                setattr(self, f"{kind}_{modality}",
                        nn.ParameterList([nn.Parameter(torch.empty(shape)) for _ in range(num_tasks)]))

    def get(self, kind: str, modality: str, task: int) -> nn.Parameter:
        return getattr(self, f"{kind}_{modality}")[task]

    def task_parameters(self, task: int) -> list[nn.Parameter]:
        return [self.get(kind, m, task) for kind in ("a", "b", "router") for m in MODALITIES]


class DeloLayer(BaseTunerLayer):
    adapter_layer_names = ("delo_pools",)
    other_param_names = ("r", "scaling", "delo_dropout")

    def __init__(self, base_layer: nn.Module, state: DeloState, **kwargs) -> None:
        self.base_layer = base_layer
        self.quantization_backend = resolve_quantization_backend(self.get_base_layer())
        self.r: dict[str, int] = {}
        self.scaling: dict[str, float] = {}
        self.delo_dropout = nn.ModuleDict({})
        self.delo_pools = nn.ModuleDict({})
        self._disable_adapters = False
        self.merged_adapters = []
        in_features, out_features = _get_in_out_features(self.get_base_layer())
        if in_features is None or out_features is None:
            raise TypeError(f"DeLo supports Linear layers, not {type(self.get_base_layer()).__name__}")
        self.in_features, self.out_features = in_features, out_features
        self.state = state   # plain reference: one state serves every layer
        self.kwargs = kwargs

    def update_layer(self, adapter_name: str, config, query_dim: int, inference_mode: bool = False,
                     **kwargs) -> None:
        self.r[adapter_name] = config.r
        self.scaling[adapter_name] = config.alpha / config.r
        self.delo_dropout[adapter_name] = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.delo_pools[adapter_name] = TaskPools(config.num_tasks, config.num_experts, self.in_features,
                                                  self.out_features, query_dim)
        self.reset_delo_parameters(adapter_name, config.init_weights)
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=inference_mode)

    @torch.no_grad()
    def reset_delo_parameters(self, adapter_name: str, init_weights: bool = True) -> None:
        pools = self.delo_pools[adapter_name]
        for a in (*pools.a_visual, *pools.a_text):
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))          # LoRA's A init, per factor row
        for b in (*pools.b_visual, *pools.b_text):
            if init_weights:
                nn.init.zeros_(b)                                # reference: B pools zero -> identity
            else:
                nn.init.normal_(b, std=0.1)                      # tests: a visible update
        for router in (*pools.router_visual, *pools.router_text):
            # Random routers spread the samples over the pool from the first step.
            nn.init.normal_(router, std=1.0 / math.sqrt(router.shape[1]))


class Linear(nn.Module, DeloLayer):
    """A frozen Linear plus the DeLo expert path."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, config, state: DeloState, query_dim: int,
                 **kwargs) -> None:
        super().__init__()
        DeloLayer.__init__(self, base_layer, state, **kwargs)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config, query_dim, inference_mode=config.inference_mode)

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        raise NotImplementedError(MERGE_ERROR)

    def unmerge(self) -> None:
        raise NotImplementedError(MERGE_ERROR)

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        raise NotImplementedError(MERGE_ERROR)

    # -- selection (also used by tests to compose the update by hand) ---------------------------------
    def select(self, adapter_name: str, modality: str, task: int, query: torch.Tensor):
        """Top-r factor indices (B, r) and their straight-through gates (B, r) for each sample."""
        router = self.delo_pools[adapter_name].get("router", modality, task)
        scores = query.to(router.dtype) @ router.T                      # (B, E)
        top = scores.topk(self.r[adapter_name], dim=-1)
        soft = torch.sigmoid(top.values)
        return top.indices, 1.0 + soft - soft.detach()

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        if self.disable_adapters or self.state.bypass or not self.state.routes:
            return result
        active = [name for name in self.active_adapters if name in self.delo_pools]
        if not active:
            return result
        samples = self.state.samples   # packed rows: routes hold one entry per sample, not per row
        rows = self.state.routes[0].weight.shape[0] if samples is None else samples.token_slot.shape[0]
        if x.dim() != 3 or x.shape[0] != rows:
            raise RuntimeError(f"DeLo expects (batch, tokens, features) inputs of the routed batch "
                               f"({rows} rows), got {tuple(x.shape)}")
        if self.quantization_backend is not None:
            result = self.quantization_backend.maybe_clone_base_result(result)
        for name in active:
            pools = self.delo_pools[name]
            h = self.delo_dropout[name](self._cast_input_dtype(x, pools.a_visual[0].dtype))
            # Every (task route, modality) selects r factors per sample; stacked side by side they
            # form one (B, R, in) / (B, R, out) pair, so the update is two batched matmuls.
            a_rows, b_rows, gates = [], [], []
            for route in self.state.routes:
                for modality, query in zip(MODALITIES, route.queries()):
                    index, gate = self.select(name, modality, route.task, query)
                    a_rows.append(pools.get("a", modality, route.task)[index])      # (B, r, in)
                    b_rows.append(pools.get("b", modality, route.task)[index])      # (B, r, out)
                    gates.append(gate * route.weight[:, None])                       # (B, r)
            # The gates follow the pools' dtype: routes computed in another precision (query maps
            # and pools cast apart) must not promote the codes.
            a, b = torch.cat(a_rows, 1), torch.cat(b_rows, 1)
            gate = torch.cat(gates, 1).to(a.dtype)
            if samples is None:
                codes = torch.bmm(h, a.transpose(1, 2)) * gate[:, None, :]          # (B, T, R)
            else:
                # Each row's samples side by side (B, slots * R); a token keeps its own sample's
                # columns only (mllm.tuners.delo.packing).
                width = a.shape[1]
                a, b, gate = per_row(samples, a), per_row(samples, b), per_row(samples, gate)
                codes = torch.bmm(h, a.transpose(1, 2)) * (gate[:, None, :] * slot_columns(samples, width, a.dtype))
            result = result + (torch.bmm(codes, b) * self.scaling[name]).to(result.dtype)
        return result

    def __repr__(self) -> str:
        return "delo." + super().__repr__()
