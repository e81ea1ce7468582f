"""MoraModel: the peft tuner that injects MoRA into a two-branch (vision, text) model."""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from torch import nn

from mllm.tuners.mora.config import MoraConfig
from mllm.tuners.mora.layer import Linear, MoraLayer, SharedFactors
from mllm.tuners.mora.pairing import Pairing

_LOW_PRECISION = (torch.float16, torch.bfloat16)


class MoraModel(BaseTuner):
    """Creates MoRA adapters (paper eqs 2-4) in the paired layers of a vision and a text tower.

    peft visits modules one by one; MoRA couples two of them. The tuner resolves the pairing from
    the model structure (``Pairing``), adapts only targeted projections of paired layers, and owns
    the per-pair shared state:

    * ``mora_shared_vision[adapter][pair]``  S^v (shared_r x d_v)
    * ``mora_shared_text[adapter][pair]``    S^t (shared_r x d_t)
    * ``mora_shared_magnitude[adapter][pair]`` a^s, common to the two layers of the pair

    They are registered here only (saved once, as ``base_model.mora_shared_*.<pair>``); layers hold
    an unregistered reference. The usual peft entry points that only visit layers (set_adapter,
    enable/disable, set_requires_grad, delete_adapter, dtype casting) are extended to them.

    Everything folds into the base weights, so ``merge_and_unload`` returns the plain model.
    """

    prefix: str = "mora_"
    tuner_layer_cls = MoraLayer
    target_module_mapping: dict = {}
    uses_shared_state = True   # no inject_adapter_in_model / transformers-native load_adapter

    def _pre_injection_hook(self, model: nn.Module, config: MoraConfig, adapter_name: str) -> None:
        # BaseTuner.__init__ resets nn.Module state first, so the containers are created here (before
        # the first injection); later adapters (add_adapter / load_adapter) find them in place.
        for name in ("mora_shared_vision", "mora_shared_text", "mora_shared_magnitude"):
            if name not in self._modules:
                setattr(self, name, nn.ModuleDict({}))

    @property
    def shared(self) -> SharedFactors:
        return SharedFactors(self.mora_shared_vision, self.mora_shared_text, self.mora_shared_magnitude)

    def pairing(self, config: MoraConfig) -> Pairing:
        cache = self.__dict__.setdefault("_mora_pairings", {})
        key = id(config)
        if key not in cache:
            cache[key] = (config, Pairing.from_config(config, self.model))   # keep config alive: stable id
        return cache[key][1]

    # -- injection ----------------------------------------------------------------------------------
    def _prepare_adapter_config(self, peft_config: MoraConfig, model_config: dict) -> MoraConfig:
        if peft_config.target_modules is None:
            raise ValueError("MoRA needs target_modules (e.g. ['q_proj', 'v_proj'])")
        return peft_config

    def _check_target_module_exists(self, peft_config: MoraConfig, key: str):
        # A module is a target when its name matches target_modules *and* its layer is paired.
        from peft.tuners.tuners_utils import check_target_module_exists

        if not check_target_module_exists(peft_config, key):
            return False
        pairing = self.pairing(peft_config)
        site = pairing.site(key)
        return site is not None and pairing.pair_of(site) is not None

    def _create_and_replace(self, peft_config: MoraConfig, adapter_name: str, target: nn.Module,
                            target_name: str, parent: nn.Module, current_key: str, **kwargs) -> None:
        pairing = self.pairing(peft_config)
        site = pairing.site(current_key)
        pair = pairing.shared_key(site)
        self._ensure_shared(peft_config, adapter_name, pairing, site, pair, target)
        if isinstance(target, MoraLayer):
            target.update_layer(adapter_name, peft_config, site.branch, pair, inference_mode=peft_config.inference_mode)
            return
        if not isinstance(target, nn.Linear):
            raise TypeError(f"MoRA adapts nn.Linear layers; {current_key} is a {type(target).__name__}")
        new_module = Linear(target, adapter_name, peft_config, self.shared, site.branch, pair)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)

    @torch.no_grad()
    def _ensure_shared(self, config: MoraConfig, adapter_name: str, pairing: Pairing, site, pair: str,
                       target: nn.Module) -> None:
        """Create S^v, S^t and a^s of ``pair`` the first time either of its layers is visited (lazily:
        peft's injection hooks do not run for add_adapter / load_adapter)."""
        for container in (self.mora_shared_vision, self.mora_shared_text, self.mora_shared_magnitude):
            if adapter_name not in container:
                container[adapter_name] = nn.ParameterDict({})
        vision, text = self.mora_shared_vision[adapter_name], self.mora_shared_text[adapter_name]
        try:
            partner = self.model.get_submodule(pairing.partner_key(site))
        except AttributeError:
            raise ValueError(f"MoRA: {site.branch} projection {site.inner!r} has no partner "
                             f"{pairing.partner_key(site)!r} in the other tower; name it in inner_pairs") from None
        widths = {site.branch: _width(target), ("text" if site.branch == "vision" else "vision"): _width(partner)}
        if pair in vision:
            for branch, store in (("vision", vision), ("text", text)):
                if store[pair].shape[1] != widths[branch]:
                    raise ValueError(f"MoRA pair {pair!r} shares S^{branch[0]} across projections of different "
                                     f"widths ({store[pair].shape[1]} vs {widths[branch]})")
            return
        weight = _base(target).weight
        dtype = weight.dtype if weight.dtype.is_floating_point else torch.float32
        device = weight.device if weight.device.type != "meta" else None
        for branch, store in (("vision", vision), ("text", text)):
            factor = torch.empty(config.shared_r, widths[branch], dtype=dtype, device=device)
            if config.init_weights:
                # LoRA's A init (bound 1/sqrt(d)). The reference's randn/sqrt(r) relies on its DoRA
                # normalisation; un-normalised eq 4 would start with an S^T G S far larger than W0.
                nn.init.kaiming_uniform_(factor, a=math.sqrt(5))
            else:
                nn.init.normal_(factor, std=0.3)   # tests: a clearly visible shared term
            store[pair] = nn.Parameter(factor, requires_grad=adapter_name in self.active_adapters)
        magnitude = torch.full((1,), config.shared_magnitude_init, dtype=dtype, device=device)
        if not config.init_weights:
            magnitude.add_(0.2 * torch.rand(()) - 0.1)
        self.mora_shared_magnitude[adapter_name][pair] = nn.Parameter(
            magnitude, requires_grad=adapter_name in self.active_adapters)

    def _check_new_adapter_config(self, config: MoraConfig) -> None:
        super()._check_new_adapter_config(config)
        if config.bias != "none":
            raise ValueError("MoRA adds no bias; bias must be 'none'")

    # -- merging: all layers or none --------------------------------------------------------------
    def _check_mergeable(self) -> None:
        # Checked for every layer before any merges, so that a refusal (a quantized base layer)
        # never leaves the model half merged (e.g. the encoder's layers merged, the LLM's not).
        for module in self.model.modules():
            if isinstance(module, Linear):
                module._check_mergeable()

    def merge_adapter(self, adapter_names: Optional[list[str]] = None, safe_merge: bool = False) -> None:
        self._check_mergeable()
        super().merge_adapter(adapter_names=adapter_names, safe_merge=safe_merge)

    def _unload_and_optionally_merge(self, merge: bool = True, *args, **kwargs) -> None:
        if merge:
            self._check_mergeable()
        return super()._unload_and_optionally_merge(merge, *args, **kwargs)

    # -- shared state follows the layer-level operations ----------------------------------------------
    def _shared_params(self, adapter_names: Optional[Sequence[str]] = None):
        for container in (self.mora_shared_vision, self.mora_shared_text, self.mora_shared_magnitude):
            for name, params in container.items():
                if adapter_names is None or name in adapter_names:
                    yield from params.values()

    def set_adapter(self, adapter_name, inference_mode: bool = False) -> None:
        super().set_adapter(adapter_name, inference_mode=inference_mode)
        active = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        for name in self.mora_shared_vision:
            for param in self._shared_params([name]):
                param.requires_grad_(name in active and not inference_mode)

    def _enable_adapter_layers(self, enabled: bool = True) -> None:
        super()._enable_adapter_layers(enabled)
        for name in self.mora_shared_vision:
            for param in self._shared_params([name]):
                param.requires_grad_(enabled and name in self.active_adapters)

    def set_requires_grad(self, adapter_names, requires_grad: bool = True) -> None:
        super().set_requires_grad(adapter_names, requires_grad=requires_grad)
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        for param in self._shared_params(names):
            param.requires_grad_(requires_grad)

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        for container in (self.mora_shared_vision, self.mora_shared_text, self.mora_shared_magnitude):
            if adapter_name in container:
                del container[adapter_name]

    def _cast_adapter_dtype(self, adapter_name: str, autocast_adapter_dtype: bool = True) -> None:
        # peft upcasts fp16/bf16 adapter weights inside tuner layers only; do the same for the shared
        # entries (re-assigned in their containers, which the layers look up at every use).
        super()._cast_adapter_dtype(adapter_name, autocast_adapter_dtype=autocast_adapter_dtype)
        if not autocast_adapter_dtype:
            return
        for container in (self.mora_shared_vision, self.mora_shared_text, self.mora_shared_magnitude):
            params = container[adapter_name] if adapter_name in container else {}
            for key in list(params.keys()):
                if params[key].dtype in _LOW_PRECISION:
                    params[key] = nn.Parameter(params[key].float(), requires_grad=params[key].requires_grad)


def _base(module: nn.Module) -> nn.Module:
    return module.get_base_layer() if isinstance(module, BaseTunerLayer) else module


def _width(module: nn.Module) -> int:
    base = _base(module)
    if not isinstance(base, nn.Linear):
        raise TypeError(f"MoRA pairs nn.Linear projections, found {type(base).__name__}")
    return base.in_features
