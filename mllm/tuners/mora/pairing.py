"""Which layer of the vision branch is paired with which layer of the text branch.

peft injects adapters one module at a time; MoRA's shared factors couple two modules that live
in different towers. The tuner therefore resolves the pairing once per adapter from the model's
structure, and for every candidate module key answers: which branch, which layer, which pair,
and which module of the *other* branch is its partner.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional

from torch import nn


@dataclass(frozen=True)
class Site:
    """Where a module sits: ``<branch layers path>.<layer>.<inner path>``."""

    branch: str            # "vision" | "text"
    layer: int
    inner: str             # path inside the layer, e.g. "self_attn.q_proj"
    root: str              # the key before the layers path ("" or e.g. "clip.")


@dataclass(frozen=True)
class Pairing:
    vision_layers: str
    text_layers: str
    pairs: tuple[tuple[int, int], ...]      # (vision index, text index), non-negative
    share_across_projections: bool
    inner_pairs: tuple[tuple[str, str], ...] = ()   # (vision path, text path) where they differ

    @classmethod
    def from_config(cls, config, model: nn.Module) -> "Pairing":
        depth = {branch: _num_layers(model, path) for branch, path in
                 (("vision", config.vision_layers), ("text", config.text_layers))}
        if config.layer_pairs is not None:
            pairs = []
            for v, t in config.layer_pairs:
                pv, pt = _normalise(v, depth["vision"], "vision"), _normalise(t, depth["text"], "text")
                pairs.append((pv, pt))
        else:
            k = config.num_paired_layers
            if k > min(depth.values()):
                raise ValueError(f"num_paired_layers={k} but the towers have {depth['vision']} vision and "
                                 f"{depth['text']} text layers")
            # Matched from the end (appendix B: the last layers carry the most semantic information,
            # and towers of different depth, e.g. ViT-L 24 vs 12, pair their final layers).
            pairs = [(depth["vision"] - k + i, depth["text"] - k + i) for i in range(k)]
        for index, branch in ((0, "vision"), (1, "text")):
            used = [p[index] for p in pairs]
            if len(set(used)) != len(used):
                raise ValueError(f"layer_pairs uses a {branch} layer twice: {sorted(used)}")
        return cls(config.vision_layers, config.text_layers, tuple(pairs), config.share_across_projections,
                   tuple((config.inner_pairs or {}).items()))

    # -- lookups -------------------------------------------------------------------------------------
    def site(self, key: str) -> Optional[Site]:
        for branch, path in (("vision", self.vision_layers), ("text", self.text_layers)):
            match = re.search(rf"(?:^|\.)({re.escape(path)})\.(\d+)\.(.+)$", key)
            if match:
                return Site(branch, int(match.group(2)), match.group(3), key[: match.start(1)])
        return None

    def pair_of(self, site: Site) -> Optional[tuple[int, int]]:
        index = 0 if site.branch == "vision" else 1
        return next((p for p in self.pairs if p[index] == site.layer), None)

    def shared_key(self, site: Site) -> Optional[str]:
        """Name of the shared entry (S^v, S^t, a^s) of this module, or None when its layer is unpaired."""
        pair = self.pair_of(site)
        if pair is None:
            return None
        name = f"v{pair[0]}_t{pair[1]}"
        if not self.share_across_projections:
            vision_inner = site.inner if site.branch == "vision" else self.partner_inner(site)
            name += "_" + vision_inner.replace(".", "_")   # the same name from both branches
        return name

    def partner_inner(self, site: Site) -> str:
        """Path inside the partner layer of the projection paired with ``site``."""
        to_text = dict(self.inner_pairs)
        mapping = to_text if site.branch == "vision" else {t: v for v, t in to_text.items()}
        return mapping.get(site.inner, site.inner)

    def partner_key(self, site: Site) -> str:
        """Module key of the corresponding projection in the paired layer of the other branch."""
        v, t = self.pair_of(site)
        other = f"{self.text_layers}.{t}" if site.branch == "vision" else f"{self.vision_layers}.{v}"
        return f"{site.root}{other}.{self.partner_inner(site)}"


def _num_layers(model: nn.Module, path: str) -> int:
    for name, module in model.named_modules():
        if (name == path or name.endswith("." + path)) and isinstance(module, nn.ModuleList):
            return len(module)
    raise ValueError(f"MoRA: no layer list (nn.ModuleList) named {path!r} in {type(model).__name__}; "
                     "set vision_layers / text_layers to the module paths of the two towers' layers")


def _normalise(index: int, depth: int, branch: str) -> int:
    resolved = index + depth if index < 0 else index
    if not 0 <= resolved < depth:
        raise ValueError(f"layer_pairs: {branch} layer {index} out of range for {depth} layers")
    return resolved
