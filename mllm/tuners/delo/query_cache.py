"""DeLo's query cache: the frozen query pass's pooled features, kept per training sample.

DeLo's query signals start from a pass over the backbone with every DeLo path bypassed; for a given
sample and a given backbone that pass always gives the same pooled features, so a training run
computes them once per sample and takes them from here on every later epoch (the trainable query
maps, routing and Task-Key Memory still run on every step, on the cached features).

What a hit has to match, so that a hit is never a wrong answer:

* the sample's inputs to the query pass: every tensor of the backbone's forward (a row of each
  batched tensor; tensors without a batch dimension and plain values are shared by every sample),
  and the modality ids already published for the forward. Token positions the 2-D attention mask
  masks out are zeroed first, so a sample padded on the right to another length is the same sample
  (its real tokens' hidden states do not depend on the padding);
* the backbone: a fingerprint of every frozen parameter and buffer (storage and in-place version),
  so loading, replacing, casting or moving weights empties the cache.

And when the cache cannot help, it stays out of the way (logged once per reason):

* the query pass's inputs depend on a trainable parameter (stage 2's first task trains the
  projectors that make the spliced media embeddings): they change every step;
* a backbone parameter outside DeLo trains;
* the backbone has dropout, which makes the query pass of a training forward random.

The cache serves training forwards only (evaluation runs the query pass as before). Entries live in
CPU memory, 2 x query_dim values per sample in the backbone's dtype (e.g. 16 KiB for a 4096-wide
bf16 LLM), and are not saved. ``DeloConfig.query_cache_max_mib`` caps them: once full the cache
keeps the samples it holds and stores no more (logged once). It evicts nothing, since every epoch
visits the samples in a new random order, so any eviction would mostly drop entries about to be
needed; a batch hits only when all its samples are held.

Sample keys are two 64-bit multilinear hashes of each input's bits, computed with tensor ops on the
input's device (no copy of the inputs to the host): for inputs that differ, both hashes agree with
probability about 2^-64.
"""

from __future__ import annotations

import logging
from typing import NamedTuple, Optional

import torch
from torch import nn

logger = logging.getLogger(__name__)

#: Forward arguments that do not change the backbone's hidden states (the loss, what is returned).
IGNORED_INPUTS = frozenset({"labels", "cache", "past_key_values", "use_cache", "num_items_in_batch", "return_dict",
                            "output_attentions", "output_hidden_states", "logits_to_keep", "return_loss"})
_PLAIN_VALUES = (type(None), bool, int, float, str)
_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
_HASHES = 2
_SEED = 0x5EED_DE10


class QueryCache:
    """Pooled query features per sample key; hit / miss counters for logs and tests."""

    def __init__(self, enabled: bool = True, max_bytes: float = float("inf")):
        self.enabled = enabled
        self.max_bytes = max_bytes
        self.bytes = 0
        self.entries: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        self.hits = self.misses = 0
        self._fingerprint: Optional[int] = None
        self._logged: set[str] = set()

    def clear(self) -> None:
        self.entries.clear()
        self.bytes = 0

    def off(self, reason: str) -> None:
        """This forward runs the query pass uncached; ``reason`` is logged once."""
        if reason not in self._logged:
            self._logged.add(reason)
            logger.info("DeLo query cache not used: %s; the frozen query pass runs on every step", reason)

    def check_backbone(self, fingerprint: int) -> None:
        if self._fingerprint is not None and fingerprint != self._fingerprint and self.entries:
            logger.info("DeLo query cache emptied: the backbone's weights changed (%d entries dropped)",
                        len(self.entries))
            self.clear()
        self._fingerprint = fingerprint

    def lookup(self, keys: list[tuple], device) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
        """(pooled (B, 2, d), present (B, 2)) when every sample is cached, else None (the whole
        batch then runs the query pass)."""
        found = [self.entries.get(key) for key in keys]
        if any(entry is None for entry in found):
            self.misses += 1
            return None
        self.hits += 1
        pooled = torch.stack([p for p, _ in found]).to(device, non_blocking=True)
        present = torch.stack([a for _, a in found]).to(device, non_blocking=True)
        return pooled, present

    def store(self, keys: list[tuple], pooled: torch.Tensor, present: torch.Tensor) -> None:
        pooled, present = pooled.detach().cpu(), present.detach().cpu()
        size = pooled[0].nbytes + present[0].nbytes
        for i, key in enumerate(keys):
            if key in self.entries:
                continue
            if self.bytes + size > self.max_bytes:
                if "full" not in self._logged:
                    self._logged.add("full")
                    logger.info("DeLo query cache full (%d samples, %.1f MiB; query_cache_max_mib): later samples "
                                "run the query pass", len(self.entries), self.bytes / 2 ** 20)
                return
            self.entries[key] = (pooled[i].clone(), present[i].clone())
            self.bytes += size


# -- when the cache may serve a forward -----------------------------------------------------------------

class BackboneState(NamedTuple):
    fingerprint: int                 # changes when a backbone tensor is replaced, moved, cast or written in place
    trainable: Optional[str]         # the name of a trainable backbone parameter, if any
    checkpointing: bool              # a module recomputes its forward (activation checkpointing is on)


def backbone_state(model: nn.Module) -> BackboneState:
    """One walk over the backbone's modules (DeLo's pools left out; plain dict reads, as it runs
    before every forward): the fingerprint of its tensors (storage, in-place version, dtype,
    device), a trainable parameter, and whether transformers' activation checkpointing is on."""
    trainable, state, checkpointing, stack = None, [], False, [("", model)]
    while stack:
        prefix, module = stack.pop()
        checkpointing = checkpointing or module.__dict__.get("gradient_checkpointing") is True
        for name, tensor in (*module._parameters.items(), *module._buffers.items()):
            if tensor is None:
                continue
            if trainable is None and tensor.requires_grad:
                trainable = prefix + name
            state.append((tensor.data_ptr(), tensor._version, tensor.dtype, tensor.device))
        stack.extend((f"{prefix}{name}.", child) for name, child in module._modules.items()
                     if child is not None and name != "delo_pools")
    return BackboneState(hash(tuple(state)), trainable, checkpointing)


def backbone_dropout(model: nn.Module) -> Optional[str]:
    """A dropout of the backbone (a module, or a config rate that attention code applies), if any."""
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.dropout._DropoutNd) and module.p > 0 and "delo_dropout" not in name:
            return name
    config = getattr(model, "config", None)
    configs = [config] + ([config.get_text_config()] if hasattr(config, "get_text_config") else [])
    for cfg in configs:
        for field, value in (vars(cfg).items() if cfg is not None else ()):
            if "dropout" in field and isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0:
                return f"config.{field}={value}"
    return None


def depends_on_trainable_parameter(tensor: torch.Tensor) -> bool:
    """Whether autograd reaches a trainable ``nn.Parameter`` from ``tensor`` (e.g. stage 2's
    projectors behind the spliced embeddings). A leaf that merely requires grad (the embedding
    output that gradient checkpointing marks) is no parameter and does not count."""
    if not tensor.requires_grad:
        return False
    if tensor.grad_fn is None:
        return isinstance(tensor, nn.Parameter)
    stack, seen = [tensor.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        if isinstance(getattr(node, "variable", None), nn.Parameter):
            return True
        stack.extend(next_node for next_node, _ in node.next_functions)
    return False


# -- sample keys ------------------------------------------------------------------------------------------

_multipliers: dict[tuple, torch.Tensor] = {}
_CHUNK = 1 << 16


def _multiplier_rows(length: int, device) -> torch.Tensor:
    """(_HASHES, length) random int64; the same prefix whatever ``length`` (padding-independent
    positions), built chunk by chunk from fixed seeds and kept per device."""
    key = (torch.device(device).type, torch.device(device).index)
    have = _multipliers.get(key)
    if have is None or have.shape[1] < length:
        chunks = []
        for k in range(-(-length // _CHUNK)):
            g = torch.Generator().manual_seed(_SEED + k)
            chunks.append(torch.randint(-2 ** 63, 2 ** 63 - 1, (_HASHES, _CHUNK), generator=g, dtype=torch.int64))
        have = _multipliers[key] = torch.cat(chunks, 1).to(device)
    return have[:, :length]


def _as_int64(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor's bits as int64 values (floats reinterpreted, not rounded)."""
    if tensor.dtype == torch.bool:
        return tensor.long()
    if tensor.is_floating_point() or tensor.is_complex():
        tensor = tensor.contiguous().view(_BITS[tensor.element_size()])
    return tensor.long()


def _row_hashes(tensor: torch.Tensor, keep: Optional[torch.Tensor]) -> torch.Tensor:
    """(B, _HASHES) hashes of each row of ``tensor`` (B, ...); with ``keep`` (B, T) positions of dim 1
    outside it are zeroed first. Bilinear over (position, rest), so the multipliers stay short and
    a position's multiplier does not depend on the row's length (integer products wrap mod 2^64)."""
    values = _as_int64(tensor)
    batch = values.shape[0]
    values = values.reshape(batch, values.shape[1], -1) if keep is not None else values.reshape(batch, 1, -1)
    if keep is not None:
        values = values * keep.to(values.device, torch.int64)[:, :, None]
    positions, width = values.shape[1:]
    inner = _multiplier_rows(width, values.device)                                # (H, width)
    outer = _multiplier_rows(positions + width, values.device)[:, width:]         # (H, positions), other draws
    # One hash at a time: the temporary is the size of the int64 values, not _HASHES times it.
    return torch.stack([((values * inner[h]).sum(-1) * outer[h]).sum(-1) for h in range(_HASHES)], 1)  # (B, H)


def sample_keys(args: tuple, kwargs: dict, modality_ids: Optional[torch.Tensor]) -> Optional[list[tuple]]:
    """One key per sample of the forward, or None when some input cannot be keyed (an object the
    cache does not know how to compare)."""
    named = {f"arg{i}": value for i, value in enumerate(args)}
    named.update((k, v) for k, v in kwargs.items() if k not in IGNORED_INPUTS)
    first = next((v for k in ("input_ids", "inputs_embeds", "arg0") if torch.is_tensor(v := named.get(k))), None)
    if first is None or first.dim() == 0:
        return None
    batch = first.shape[0]
    mask = named.get("attention_mask")
    keep = mask if torch.is_tensor(mask) and mask.dim() == 2 and mask.shape[0] == batch else None
    if modality_ids is not None and modality_ids.dim() == 2 and modality_ids.shape[0] == batch:
        named["modality_ids"] = modality_ids
    shared, rows, hashes = [], [], []
    for name in sorted(named):
        value = named[name]
        if not torch.is_tensor(value):
            if not isinstance(value, _PLAIN_VALUES):
                return None
            shared.append((name, value))
            continue
        if value.dim() == 0 or value.shape[0] != batch:
            shared.append((name, value.dtype, tuple(value.shape), *_row_hashes(value.reshape(1, -1), None)[0]))
            continue
        aligned = keep is not None and value.dim() >= 2 and value.shape[1] == keep.shape[1]
        rows.append((name, value.dtype, tuple(value.shape[2:] if aligned else value.shape[1:]), aligned))
        hashes.append(_row_hashes(value, keep if aligned else None))
    shared_values = tuple(tuple(v.item() if torch.is_tensor(v) else v for v in entry) for entry in shared)
    per_sample = torch.stack(hashes, 1).cpu().tolist() if hashes else [[] for _ in range(batch)]  # one sync
    lengths = keep.sum(-1).tolist() if keep is not None else [None] * batch
    return [(shared_values, tuple(rows), lengths[i], tuple(map(tuple, per_sample[i]))) for i in range(batch)]
