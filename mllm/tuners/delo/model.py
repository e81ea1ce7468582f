"""DeloModel: the peft tuner that injects DeLo experts and owns the routing (queries, guided
routing, task partitioning, Task-Key Memory)."""

from __future__ import annotations

import logging
from typing import Optional

import torch
import torch.nn.functional as F
from peft.tuners.tuners_utils import BaseTuner
from torch import nn

from mllm.distributed import several_ranks
from mllm.modality import Modality
from mllm.modality_context import (
    cached_length,
    get_modality_context,
    kv_cache,
    release_tracking_context,
    tracking_context,
)
from mllm.tuners.delo.config import TARGET_MODULES_BY_MODEL_TYPE, DeloConfig
from mllm.tuners.delo.layer import MERGE_ERROR, DeloLayer, Linear
from mllm.tuners.delo.packing import packed_samples, pool_per_sample
from mllm.tuners.delo.query_cache import (
    BackboneState,
    QueryCache,
    backbone_dropout,
    backbone_state,
    depends_on_trainable_parameter,
    sample_keys,
)
from mllm.tuners.delo.state import IMAGE_MISSING, TEXT_MISSING, DeloState, TaskRoute

logger = logging.getLogger(__name__)

_LOW_PRECISION = (torch.float16, torch.bfloat16)


class TaskQueries(nn.Module):
    """Model-level per-task state of one adapter.

    * ``proj_visual[k]`` / ``proj_text[k]`` (query_dim x query_dim, identity at start): turn the
      frozen pooled features into task k's query signals q_v, q_t. The paper trains an alignment
      loss between q_v and q_t, which needs something learnable between the frozen backbone and the
      queries; it does not say what, so a per-task linear map is our choice (per task, so task
      partitioning also covers it).
    * Task-Key Memory: ``keys[k, m]`` is the running mean of the frozen pooled feature of modality m
      (0 visual, 1 text) over task k's training samples, ``counts[k, m]`` how many were seen.
      Accumulated, not learned by gradient (the reference uses an EMA; an exact mean does not
      depend on the order or number of steps). Keys per modality let a sample that lacks one
      modality be matched on the one it has.
    """

    def __init__(self, num_tasks: int, query_dim: int, device=None, dtype=None):
        super().__init__()
        # Built directly on the device and in the dtype of the adapted weights, as peft's LoRA
        # builds its factors (fp16/bf16 are upcast afterwards when autocast_adapter_dtype is on):
        # no .to() afterwards, which would fail for peft's low_cpu_mem_usage (meta parameters).
        self.proj_visual = nn.ParameterList([nn.Parameter(torch.eye(query_dim, device=device, dtype=dtype))
                                             for _ in range(num_tasks)])
        self.proj_text = nn.ParameterList([nn.Parameter(torch.eye(query_dim, device=device, dtype=dtype))
                                           for _ in range(num_tasks)])
        # The memory is an exact running mean: float32 whatever the model's dtype.
        self.register_buffer("keys", torch.zeros(num_tasks, 2, query_dim, device=device))
        self.register_buffer("counts", torch.zeros(num_tasks, 2, device=device))

    def task_parameters(self, task: int) -> list[nn.Parameter]:
        return [self.proj_visual[task], self.proj_text[task]]

    @torch.no_grad()
    def accumulate(self, task: int, pooled: torch.Tensor, available: torch.Tensor) -> None:
        """pooled (B, 2, d) frozen features, available (B, 2) bool."""
        weight = available.to(pooled.dtype)
        added = weight.sum(0)                                            # (2,)
        total = (pooled * weight[..., None]).sum(0)                      # (2, d)
        if several_ranks():
            # Data parallel: every rank adds the whole global batch, so the memory stays the same on
            # all ranks and equals a single-process run's (every rank trains on every step).
            sums = torch.cat([added[:, None], total], dim=1).float()
            torch.distributed.all_reduce(sums)
            added, total = sums[:, 0].to(added.dtype), sums[:, 1:].to(total.dtype)
        count = self.counts[task] + added
        mean = self.keys[task] + (total - added[:, None] * self.keys[task]) / count.clamp(min=1)[:, None]
        self.keys[task] = torch.where(added[:, None] > 0, mean.to(self.keys.dtype), self.keys[task])
        self.counts[task] = count

    @torch.no_grad()
    def predict(self, pooled: torch.Tensor, available: torch.Tensor) -> Optional[torch.Tensor]:
        """Per-sample task: cosine similarity to each learned key, averaged over the sample's
        available modalities, argmax over tasks with keys. None when no key exists yet. (The
        reference then takes the batch's most frequent task for every sample; choosing per sample
        lets one batch mix tasks, which the layers support with dense per-task weights.)"""
        learned = self.counts.sum(-1) > 0                                 # (T,)
        if not learned.any():
            return None
        sims = F.cosine_similarity(pooled[:, None].float(), self.keys[None].float(), dim=-1)   # (B, T, 2)
        weight = available[:, None, :].float()
        score = (sims * weight).sum(-1) / weight.sum(-1).clamp(min=1)
        score = score.masked_fill(~learned[None], float("-inf"))
        return score.argmax(-1)


class DeloModel(BaseTuner):
    """Creates DeLo adapters (dual decomposed low-rank experts, figures 2-3).

    Before every forward of the wrapped model a pre-hook runs the frozen backbone once (every DeLo
    path bypassed) to get per-sample query signals: the mean of the last hidden states over the
    sample's visual tokens and over its text tokens. Token modalities come from the model's
    ``ModalityContext``: published by a ``MultimodalLM``, supplied with
    ``mllm.modality_context.set_modality_ids``, all text for a forward given ``input_ids`` alone, or
    published by a hook during the forward (ViLT: ``mllm.continual.vilt_ids``). Missing modalities come from
    ``set_missing`` (MMP codes: 0 complete, 1 text missing, 2 image missing), else from which
    modalities have tokens.

    * Cross-modal guided routing: a missing modality's query is replaced by the available one's
      (q_t := q_v for image-only inputs and q_v := q_t for text-only ones), figure 2 top.
    * Task partitioning: ``set_task(k)`` makes only task k's pools, routers and query maps
      trainable; every other task's parameters have ``requires_grad=False``.
    * Task-Key Memory: in training the current task's keys accumulate; at inference the task is
      chosen per sample from the memory unless ``force_task`` gives it.
    """

    prefix: str = "delo_"
    tuner_layer_cls = DeloLayer
    target_module_mapping = TARGET_MODULES_BY_MODEL_TYPE
    uses_shared_state = True   # delo_query lives on the tuner

    # -- setup ------------------------------------------------------------------------------------------
    def _pre_injection_hook(self, model: nn.Module, config: DeloConfig, adapter_name: str) -> None:
        if "delo_query" not in self._modules:
            self.delo_query = nn.ModuleDict({})

    def _prepare_adapter_config(self, peft_config: DeloConfig, model_config: dict) -> DeloConfig:
        if peft_config.target_modules is None:
            targets = self.target_module_mapping.get(model_config.get("model_type"))
            peft_config.target_modules = set(targets) if targets else "all-linear"
        return peft_config

    @property
    def state(self) -> DeloState:
        # Created lazily (peft's injection hooks do not run for add_adapter / load_adapter).
        state = self.__dict__.get("_delo_state")
        if state is None:
            # The wrapped model's modality context (a MultimodalLM has attached one already; a plain
            # model gets a tracking one: input_ids alone are text). The query pass reads only ids
            # published during it (the context's step counter), so hook order does not matter.
            tracking_context(self.model)
            state = self.__dict__["_delo_state"] = DeloState()
            self.__dict__["_delo_hook"] = self.model.register_forward_pre_hook(self._before_forward,
                                                                               with_kwargs=True)
        return state

    @property
    def current_task(self) -> int:
        return self.__dict__.get("_delo_task", 0)

    def _query_dim(self, config: DeloConfig) -> int:
        if config.query_dim is not None:
            return config.query_dim
        model_config = getattr(self.model, "config", None)
        hidden = getattr(model_config, "hidden_size", None)
        if hidden is None and hasattr(model_config, "get_text_config"):
            hidden = getattr(model_config.get_text_config(), "hidden_size", None)
        if hidden is None:
            raise ValueError("DeLo could not read hidden_size from the model config; set query_dim")
        return hidden

    def _create_and_replace(self, peft_config: DeloConfig, adapter_name: str, target: nn.Module,
                            target_name: str, parent: nn.Module, current_key: str, **kwargs) -> None:
        self._pre_injection_hook(self.model, peft_config, adapter_name)
        query_dim = self._query_dim(peft_config)
        if adapter_name not in self.delo_query:
            weight = getattr(target.get_base_layer() if isinstance(target, DeloLayer) else target, "weight", None)
            real = weight is not None and weight.device.type != "meta"
            self.delo_query[adapter_name] = TaskQueries(
                peft_config.num_tasks, query_dim, device=weight.device if real else None,
                dtype=weight.dtype if real and weight.is_floating_point() else None)
        if isinstance(target, DeloLayer):
            target.update_layer(adapter_name, peft_config, query_dim, inference_mode=peft_config.inference_mode)
        elif not isinstance(target, nn.Linear):
            raise TypeError(f"DeLo adapts nn.Linear layers; {current_key} is a {type(target).__name__}")
        else:
            new_module = Linear(target, adapter_name, peft_config, self.state, query_dim)
            self._replace_module(parent, target_name, new_module, target)
        # requires_grad per task is set once after injection (_mark_only_adapters_as_trainable).

    @classmethod
    def _remove_adapter_name_from_key(cls, key: str, adapter_name: str) -> str:
        # Our containers nest below the adapter name ("delo_pools.<adapter>.a_visual.0"); drop the
        # name right after the container so checkpoints do not depend on it (peft's default only
        # strips it from the last two positions).
        for container in ("delo_pools", "delo_query"):
            marker = f".{container}.{adapter_name}."
            if marker in key:
                return key.replace(marker, f".{container}.", 1)
        return super()._remove_adapter_name_from_key(key, adapter_name)

    def _check_new_adapter_config(self, config: DeloConfig) -> None:
        super()._check_new_adapter_config(config)
        if config.bias != "none":
            raise ValueError("DeLo adds no bias; bias must be 'none'")

    def _check_merge_allowed(self):
        raise NotImplementedError(MERGE_ERROR)

    # -- caller controls (sticky until changed) ---------------------------------------------------------
    def set_task(self, task: int) -> None:
        """Start training task ``task``: only its pools, routers and query maps stay trainable."""
        tasks = {self.peft_config[name].num_tasks for name in self.delo_query}
        if any(not 0 <= task < n for n in tasks):
            raise ValueError(f"task {task} out of range for num_tasks {sorted(tasks)}")
        self.__dict__["_delo_task"] = task
        self._apply_task_partition()

    def begin_training(self) -> None:
        """Train the task the active adapter's config names (``DeloConfig.task``): its pools,
        routers and query maps only (mllm.train.continuation calls this before each run)."""
        name = self.active_adapters[0]
        task = self.peft_config[name].task
        self.set_task(task)
        counts = self.delo_query[name].counts.sum(-1)
        untrained = [t for t in range(task) if counts[t] == 0]
        if untrained:
            logger.warning("adapter %r has no Task-Key Memory for earlier task(s) %s: was each trained "
                           "before task %d?", name, untrained, task)
        if counts[task] > 0:
            logger.warning("adapter %r already holds task %d's keys; this run adds to them", name, task)

    def set_missing(self, codes: Optional[torch.Tensor]) -> None:
        """Per-sample missing codes for the following forwards (None: infer from the tokens)."""
        self.state.missing = None if codes is None else torch.as_tensor(codes).long()

    def force_task(self, task_ids) -> None:
        """Route every sample to the given task(s) (int or (B,) tensor); None: Task-Key Memory at
        eval and the current task in training."""
        self.state.forced_task = None if task_ids is None else torch.as_tensor(task_ids).long()

    def alignment_loss(self) -> torch.Tensor:
        """1 - cos(q_v, q_t) averaged over the complete samples of the last forward (the paper's
        L_align; the reference uses CosineEmbeddingLoss with target 1, the same quantity)."""
        losses, count = [], 0
        for q_visual, q_text, complete in self.state.align_pairs:
            weight = complete.to(q_visual.dtype)
            losses.append(((1 - F.cosine_similarity(q_visual, q_text, dim=-1)) * weight).sum())
            count += weight.sum()
        if not losses or float(count) == 0:
            return torch.zeros((), device=next(iter(self.delo_query.parameters())).device)
        return torch.stack(losses).sum() / count

    # -- the query pass ---------------------------------------------------------------------------------
    def _modality_ids(self, context, step: int, length: int, batch: int, device) -> torch.Tensor:
        """The ids published for this forward (during the query pass, whatever order the model's
        hooks run in) or supplied by the caller; never an earlier forward's."""
        if context is not None and context.published_since(step) and \
                tuple(context.modality_ids.shape) == (batch, length):
            return context.modality_ids.to(device)
        raise RuntimeError("DeLo needs per-token modality ids for this forward (only input_ids with no media "
                           "input are taken as text; inputs_embeds may hide media): call "
                           "mllm.modality_context.set_modality_ids(model, ids) before the forward, or publish "
                           "them from a hook (e.g. mllm.continual.vilt_ids.publish_vilt_modality_ids)")

    def _before_forward(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        state = self.state
        if state.bypass:
            return
        if not len(self.delo_query) or not self.__dict__.get("_delo_enabled", True):
            # Adapters disabled (e.g. PeftModel.disable_adapter()): no query pass, no memory update.
            state.routes, state.align_pairs, state.task_ids = [], [], None
            return
        cache = kv_cache(kwargs)
        if cached_length(cache) > 0:
            # A KV-cache decode step sees only the new tokens; routing is per sample, so the
            # prompt pass's routing (sticky in the state) holds for the whole generation.
            return
        # The query pass must not touch a cache the real pass will fill, nor compute a loss.
        query_kwargs = {k: v for k, v in kwargs.items() if k not in ("cache", "past_key_values", "labels")}
        if "use_cache" in query_kwargs or cache is not None:
            query_kwargs["use_cache"] = False
        context = get_modality_context(self.model)
        backbone = backbone_state(self.model)
        pooled, available = self._query_features(module, args, query_kwargs, context, backbone)
        batch, device = pooled.shape[0], pooled.device   # packed rows: one entry per sample from here on
        if state.missing is not None:
            codes = state.missing.to(device)
            available = available & torch.stack([codes != IMAGE_MISSING, codes != TEXT_MISSING], dim=1)
        pooled = pooled * available[..., None]     # a missing modality's filler carries no signal
        complete = available.all(-1)

        if len(self.active_adapters) != 1:
            # Routing (queries, task choice, memory) belongs to one adapter; tasks live inside it.
            raise ValueError(f"DeLo routes one active adapter at a time, got {self.active_adapters}")
        name = self.active_adapters[0]
        queries: TaskQueries = self.delo_query[name]
        training = module.training
        if state.forced_task is not None:
            task_ids = state.forced_task.to(device).expand(batch)
        elif training:
            task_ids = torch.full((batch,), self.current_task, dtype=torch.long, device=device)
        else:
            predicted = queries.predict(pooled, available)
            task_ids = predicted if predicted is not None else \
                torch.full((batch,), self.current_task, dtype=torch.long, device=device)
        if training:
            queries.accumulate(self.current_task, pooled, available)

        routes, pairs = [], []
        # Without activation checkpointing no layer is recomputed, so all of them share one
        # computation of the queries (TaskRoute).
        shared = not backbone.checkpointing
        for task in task_ids.unique().tolist():
            proj_visual = queries.proj_visual[task]
            route = TaskRoute(task, pooled, available, proj_visual, queries.proj_text[task],
                              (task_ids == task).to(proj_visual.dtype), shared)
            routes.append(route)
            pairs.append((*route.raw_queries(), complete & (task_ids == task)))
        state.routes, state.align_pairs, state.task_ids = routes, pairs, task_ids

    def _query_features(self, module: nn.Module, args: tuple, query_kwargs: dict, context, backbone: BackboneState):
        """Each sample's last hidden states of the frozen backbone mean-pooled over its visual and
        its text tokens (B, 2, d), and whether it has tokens of each (B, 2): from the query cache,
        else from the query pass (whose result then fills the cache)."""
        segments = context.segment_ids if context is not None else None
        self.state.samples = None
        if segments is None:
            keys, device = self._query_cache_keys(module, args, query_kwargs, context, backbone)
        else:
            # The cache keys whole rows; a packed row's features are per sample (and rows are rare repeats).
            keys, device = None, None
            if module.training and getattr(self.peft_config[self.active_adapters[0]], "query_cache", False):
                self.query_cache.off("packed rows (data.packing) are pooled per sample")
        if keys is not None:
            cached = self.query_cache.lookup(keys, device)
            if cached is not None:
                return cached
        step = context.step if context is not None else 0
        with torch.no_grad(), self.state.bypassing():
            out = self.model(*args, **{**query_kwargs, "output_hidden_states": True})
        hidden = out.hidden_states[-1].detach()
        batch, length = hidden.shape[:2]
        ids = self._modality_ids(context, step, length, batch, hidden.device)
        masks = torch.stack([ids == int(Modality.VISUAL), ids == int(Modality.TEXT)], dim=1).to(hidden.dtype)
        if segments is None:
            pooled = masks @ hidden / masks.sum(-1, keepdim=True).clamp(min=1)      # (B, 2, d)
            present = masks.sum(-1) > 0                                               # (B, 2)
        else:   # packed rows: one entry per sample (mllm.tuners.delo.packing)
            self.state.samples = packed_samples(segments.to(hidden.device))
            pooled, present = pool_per_sample(hidden, masks, self.state.samples)
        if keys is not None:
            self.query_cache.store(keys, pooled, present)
        return pooled, present

    @property
    def query_cache(self) -> QueryCache:
        cache = self.__dict__.get("_delo_query_cache")
        if cache is None:
            config = self.peft_config[self.active_adapters[0]] if self.active_adapters else None
            max_mib = getattr(config, "query_cache_max_mib", float("inf"))
            cache = self.__dict__["_delo_query_cache"] = QueryCache(max_bytes=max_mib * 2 ** 20)
        return cache

    def _query_cache_keys(self, module: nn.Module, args: tuple, query_kwargs: dict, context,
                          backbone: BackboneState):
        """(per-sample keys, device) when the query cache may serve this forward, else (None, None):
        training forwards of an adapter with ``query_cache`` on, whose query pass is a fixed
        function of the keyed inputs (``mllm.tuners.delo.query_cache``)."""
        name = self.active_adapters[0]
        if not module.training or not getattr(self.peft_config[name], "query_cache", False):
            return None, None
        cache = self.query_cache
        tensors = [v for v in (*args, *query_kwargs.values()) if torch.is_tensor(v)]
        if any(depends_on_trainable_parameter(t) for t in tensors):
            cache.off("the query pass's inputs depend on trainable parameters (e.g. stage 2's projectors "
                      "train in the first task)")
            return None, None
        if backbone.trainable is not None:
            cache.off(f"backbone parameter {backbone.trainable} trains")
            return None, None
        if "_delo_backbone_dropout" not in self.__dict__:
            self.__dict__["_delo_backbone_dropout"] = backbone_dropout(self.model)
        dropout = self.__dict__["_delo_backbone_dropout"]
        if dropout is not None:
            cache.off(f"the backbone has dropout ({dropout}), so its training forwards are random")
            return None, None
        cache.check_backbone(backbone.fingerprint)
        ids = context.modality_ids if context is not None else None
        keys = sample_keys(args, query_kwargs, ids)
        if keys is None:
            cache.off("a forward input is neither a tensor nor a plain value")
            return None, None
        return keys, tensors[0].device

    # -- task partitioning follows every peft operation that sets requires_grad -------------------------
    def _apply_task_partition(self) -> None:
        task = self.current_task
        active = set(self.active_adapters)
        for module in self.model.modules():
            if isinstance(module, DeloLayer):
                for name, pools in module.delo_pools.items():
                    trainable = (name in active and not module.disable_adapters
                                 and not self.peft_config[name].inference_mode)
                    for t in range(self.peft_config[name].num_tasks):
                        for param in pools.task_parameters(t):
                            param.requires_grad_(trainable and t == task)
        for name, queries in self.delo_query.items():
            trainable = name in active and not self.peft_config[name].inference_mode
            for t in range(len(queries.proj_visual)):
                for param in queries.task_parameters(t):
                    param.requires_grad_(trainable and t == task)

    def _mark_only_adapters_as_trainable(self, model: nn.Module) -> None:
        super()._mark_only_adapters_as_trainable(model)
        self._apply_task_partition()

    def set_adapter(self, adapter_name, inference_mode: bool = False) -> None:
        super().set_adapter(adapter_name, inference_mode=inference_mode)
        self._apply_task_partition()
        if inference_mode:
            for param in self.delo_query.parameters():
                param.requires_grad_(False)

    def _enable_adapter_layers(self, enabled: bool = True) -> None:
        super()._enable_adapter_layers(enabled)
        self.__dict__["_delo_enabled"] = enabled
        self._apply_task_partition()

    def unload(self) -> nn.Module:
        # The base model must not keep our pre-hook (it would run query passes for nothing).
        handle = self.__dict__.pop("_delo_hook", None)
        if handle is not None:
            handle.remove()
        self.__dict__.pop("_delo_state", None)
        release_tracking_context(self.model)
        return super().unload()

    def set_requires_grad(self, adapter_names, requires_grad: bool = True) -> None:
        super().set_requires_grad(adapter_names, requires_grad=requires_grad)
        if requires_grad:
            self._apply_task_partition()
        else:
            names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
            for name in names:
                if name in self.delo_query:
                    self.delo_query[name].requires_grad_(False)

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        if adapter_name in self.delo_query:
            del self.delo_query[adapter_name]

    def _cast_adapter_dtype(self, adapter_name: str, autocast_adapter_dtype: bool = True) -> None:
        super()._cast_adapter_dtype(adapter_name, autocast_adapter_dtype=autocast_adapter_dtype)
        if autocast_adapter_dtype and adapter_name in self.delo_query:
            queries = self.delo_query[adapter_name]
            if any(p.dtype in _LOW_PRECISION for p in queries.parameters()):
                queries.float()


def task_parameter_names(model: nn.Module, task: int) -> list[str]:
    """Names of every parameter that belongs to ``task`` (pools, routers, query maps)."""
    names = []
    for name, _ in model.named_parameters():
        parts = name.split(".")
        if ("delo_pools" in parts or "delo_query" in parts) and parts[-1] == str(task) and \
                parts[-2] in {f"{k}_{m}" for k in ("a", "b", "router") for m in ("visual", "text")} | \
                {"proj_visual", "proj_text"}:
            names.append(name)
    return names
