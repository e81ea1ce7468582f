"""The MoRA-adapted Linear (paper eq 4).

For a targeted square projection W0 (d x d) of a paired layer of branch b (vision or text, the
other branch being o):

    W' = a^b W0 + eta B^b A^b + a^s W0 + eta S^b^T G^o S^b,        G^o = S^o S^o^T  (eq 3)

A^b (r x d), B^b (d x r) and the scalar magnitude a^b belong to this layer; S^b (shared_r x d),
S^o and the scalar a^s belong to the *pair* and live on the tuner (``MoraModel``), so they are
stored once. Each layer keeps a plain (unregistered) reference to the tuner's containers and looks
its entries up by pair name at every use, so dtype casts and device moves of the shared
parameters stay visible to both layers of a pair.

Forward, with h = dropout(x) (dropout on the low-rank paths only, as LoRA does):

    y = W0 x + b + (a^b + a^s - 1) W0 x + eta [B, S^T G^o] ([A; S] h)

The magnitude term is written as a correction to the base output so that the base layer runs
unchanged (also when quantised) and so that at initialisation, where a^b + a^s = 1 exactly, the
correction is exactly zero. The magnitudes scale W0 only, not the bias (eq 2 decomposes W).

Magnitudes are scalars: eq 1 takes the Frobenius norm of the whole matrix. (The reference code
uses DoRA-style per-output-column vectors normalised by column norms; we follow the paper.)
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch
import torch.nn.functional as F
from peft.tuners.tuners_utils import BaseTunerLayer, _get_in_out_features, check_adapters_to_merge
from peft.utils import resolve_quantization_backend
from torch import nn

from mllm.distributed import gathered_parameters


class SharedFactors:
    """The tuner's shared containers, referenced (not registered) by every MoRA layer.

    ``vision[adapter][pair]`` is S^v (shared_r x d_v), ``text[adapter][pair]`` is S^t
    (shared_r x d_t) and ``magnitude[adapter][pair]`` is a^s (shape (1,))."""

    def __init__(self, vision: nn.ModuleDict, text: nn.ModuleDict, magnitude: nn.ModuleDict):
        self.vision, self.text, self.magnitude = vision, text, magnitude

    def factors(self, adapter: str, pair: str, branch: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(S of this branch, S of the other branch, a^s)."""
        own, other = (self.vision, self.text) if branch == "vision" else (self.text, self.vision)
        return own[adapter][pair], other[adapter][pair], self.magnitude[adapter][pair]


def shared_update(s_own: torch.Tensor, s_other: torch.Tensor) -> torch.Tensor:
    """S_own^T G_other S_own with G_other = S_other S_other^T (eqs 3-4), a (d_own x d_own) matrix."""
    gram_other = s_other @ s_other.T
    return s_own.T @ gram_other @ s_own


class MoraLayer(BaseTunerLayer):
    # Trainable per-layer containers keyed by adapter name (all names carry the "mora_" prefix).
    adapter_layer_names = ("mora_A", "mora_B", "mora_magnitude")
    other_param_names = ("mora_dropout", "mora_branch", "mora_pair", "mora_strength")

    def __init__(self, base_layer: nn.Module, shared: SharedFactors, **kwargs) -> None:
        self.base_layer = base_layer
        self.quantization_backend = resolve_quantization_backend(self.get_base_layer())
        self.mora_A = nn.ParameterDict({})           # (r, d)
        self.mora_B = nn.ParameterDict({})           # (d, r)
        self.mora_magnitude = nn.ParameterDict({})   # (1,): a^v or a^t
        self.mora_dropout = nn.ModuleDict({})
        self.mora_branch: dict[str, str] = {}        # adapter -> "vision" | "text"
        self.mora_pair: dict[str, str] = {}          # adapter -> key of the shared entry
        self.mora_strength: dict[str, float] = {}    # adapter -> eta
        self._disable_adapters = False
        self.merged_adapters = []
        in_features, out_features = _get_in_out_features(self.get_base_layer())
        if in_features is None or out_features is None:
            raise TypeError(f"MoRA supports Linear layers, not {type(self.get_base_layer()).__name__}")
        if in_features != out_features:
            # S^T G S is d_in x d_in, so the adapted weight must be square (CLIP's q/k/v/out are).
            raise TypeError(f"MoRA adapts square projections; this one is {out_features} x {in_features}")
        self.in_features, self.out_features = in_features, out_features
        # A plain attribute, not a submodule: the shared factors are registered on the tuner only,
        # so they appear once in the state dict.
        self.__dict__["mora_shared"] = shared
        self.kwargs = kwargs

    def update_layer(self, adapter_name: str, config, branch: str, pair: str, inference_mode: bool = False,
                     **kwargs) -> None:
        self.mora_branch[adapter_name] = branch
        self.mora_pair[adapter_name] = pair
        self.mora_strength[adapter_name] = float(config.alpha)
        self.mora_dropout[adapter_name] = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.mora_A[adapter_name] = nn.Parameter(torch.empty(config.r, self.in_features))
        self.mora_B[adapter_name] = nn.Parameter(torch.empty(self.out_features, config.r))
        self.mora_magnitude[adapter_name] = nn.Parameter(torch.empty(1))
        self.reset_mora_parameters(adapter_name, config)
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=inference_mode)

    @torch.no_grad()
    def reset_mora_parameters(self, adapter_name: str, config) -> None:
        A, B, magnitude = self.mora_A[adapter_name], self.mora_B[adapter_name], self.mora_magnitude[adapter_name]
        s_own, s_other, shared_magnitude = self.shared_factors(adapter_name)
        nn.init.kaiming_uniform_(A, a=math.sqrt(5))   # LoRA's A init
        if config.init_weights:
            # Identity at initialisation. The shared term S^T G^o S cannot start at zero without
            # killing its own gradients: both branches' updates are functions of P = S^t^T S^v
            # (vision: P^T P, text: P P^T), so P = 0 is a stationary point and S would never train.
            # Instead S^v, S^t start random and the specific factors start as the negative of the
            # shared term: A[:shared_r] = S, B[:, :shared_r] = -S^T G^o, so B A = -S^T G^o S and
            # the low-rank terms cancel. Every parameter gets a gradient from the first step and W'
            # keeps exactly the form of eq 4. The remaining columns follow LoRA (A random, B zero).
            # (The reference instead starts from W' ~ 2 W0 with B = 0 and non-zero shared terms.)
            k = s_own.shape[0]
            A[:k].copy_(s_own)
            B.zero_()
            B[:, :k].copy_(-(s_own.T.float() @ (s_other.float() @ s_other.T.float())).to(B.dtype))
            # a^b + a^s = 1: the two W0 terms of eq 2 sum to W0.
            magnitude.fill_(1.0 - config.shared_magnitude_init)
        else:
            nn.init.normal_(B, std=0.1)   # tests: a non-identity adapter
            magnitude.fill_(1.0 - config.shared_magnitude_init).add_(0.2 * torch.rand(()) - 0.1)

    def shared_factors(self, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.mora_shared.factors(adapter_name, self.mora_pair[adapter_name], self.mora_branch[adapter_name])


class Linear(nn.Module, MoraLayer):
    """A frozen square Linear plus MoRA's magnitude, modality-specific and shared terms."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, config, shared: SharedFactors, branch: str,
                 pair: str, **kwargs) -> None:
        super().__init__()
        MoraLayer.__init__(self, base_layer, shared, **kwargs)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config, branch, pair, inference_mode=config.inference_mode)

    # -- merging ----------------------------------------------------------------------------------
    def _magnitude(self, adapter: str) -> torch.Tensor:
        """a^b + a^s: the total factor on W0 in eq 4."""
        return self.mora_magnitude[adapter].float() + self.shared_factors(adapter)[2].float()

    def _low_rank_weight(self, adapter: str) -> torch.Tensor:
        """eta (B A + S^T G^o S), in float32 (the shared and per-layer factors may differ in dtype)."""
        s_own, s_other, _ = self.shared_factors(adapter)
        specific = self.mora_B[adapter].float() @ self.mora_A[adapter].float()
        return self.mora_strength[adapter] * (specific + shared_update(s_own.float(), s_other.float()))

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        """W' - W0 = (a^b + a^s - 1) W0 + eta (B A + S^T G^o S), for the current base weight W0."""
        base = self.get_base_weight()
        delta = (self._magnitude(adapter) - 1.0) * base.float() + self._low_rank_weight(adapter)
        return delta.to(base.dtype)

    def _merge_parameters(self, adapter: str) -> list[torch.Tensor]:
        """Every tensor a merge of ``adapter`` reads or writes (gathered together under ZeRO-3)."""
        return [self.get_base_layer().weight, self.mora_A[adapter], self.mora_B[adapter],
                self.mora_magnitude[adapter], *self.shared_factors(adapter)]

    def _check_mergeable(self) -> None:
        if self.quantization_backend is not None:
            # Re-quantizing a^b W0 + eta(...) loses most of a trained update (one NF4 step is larger
            # than it); the adapted model would silently change.
            raise NotImplementedError(
                "MoRA does not merge into quantized base weights; dequantize the base model first "
                "(MultimodalLM.merge_tuner does) or keep the adapter unmerged")

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        self._check_mergeable()
        for name in check_adapters_to_merge(self, adapter_names):
            if name not in self.mora_A:
                continue
            # Under ZeRO-3 every tensor involved is partitioned: gather, merge on rank 0, re-partition.
            with gathered_parameters(self._merge_parameters(name), modifier_rank=0):
                base = self.get_base_weight()
                merged = (self._magnitude(name) * base.float() + self._low_rank_weight(name)).to(base.dtype)
                if safe_merge and not torch.isfinite(merged).all():
                    raise ValueError(f"NaNs detected in the merged weights. The adapter {name} seems to be broken")
                base.copy_(merged)   # in place, so that ZeRO-3 re-partitions the merged values
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        if not self.merged:
            return
        self._check_mergeable()
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            if name not in self.mora_A:
                continue
            with gathered_parameters(self._merge_parameters(name), modifier_rank=0):
                merged = self.get_base_weight()
                # Invert W' = m W0 + L: W0 = (W' - L) / m (m = a^b + a^s, 1 at initialisation).
                merged.copy_((merged.float() - self._low_rank_weight(name)) / self._magnitude(name))

    # -- forward ------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        if self.merged:
            return result
        active = [name for name in self.active_adapters if name in self.mora_A]
        if not active:
            return result
        if self.quantization_backend is not None:
            result = self.quantization_backend.maybe_clone_base_result(result)
        bias = getattr(self.get_base_layer(), "bias", None)
        base_out = result if bias is None else result - bias   # W0 x
        for name in active:
            A, B = self.mora_A[name], self.mora_B[name]
            s_own, s_other, _ = self.shared_factors(name)
            # Magnitudes (a^b + a^s - 1) W0 x: exactly zero at initialisation.
            result = result + ((self._magnitude(name) - 1.0).to(result.dtype)) * base_out
            h = self.mora_dropout[name](self._cast_input_dtype(x, A.dtype))
            s_own, s_other = s_own.to(A.dtype), s_other.to(A.dtype)
            gram_other = s_other @ s_other.T                                         # G^o (eq 3)
            # B A + S^T G^o S = [B, S^T G^o] [A; S]: both low-rank terms in two token-level matmuls.
            down = torch.cat([A, s_own])                                             # (r + shared_r, d)
            up = torch.cat([B, s_own.T @ gram_other], dim=1)                         # (d, r + shared_r)
            low_rank = F.linear(F.linear(h, down), up)
            result = result + (self.mora_strength[name] * low_rank).to(result.dtype)
        return result

    def __repr__(self) -> str:
        return "mora." + super().__repr__()
