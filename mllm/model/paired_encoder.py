"""MoRA across an encoder and the LLM (stage 2 with ``tuner.options.pair_encoder``).

MoRA couples paired layers of two towers through shared factors (paper eqs 3-4); in the MLLM the
towers are a media encoder (e.g. the CLIP vision tower) and the LLM. peft adapts one module tree,
so the encoder is also registered as a child of the LLM, under ``PAIRED_ENCODER``, before the
adapter is created or loaded. It stays the same module object as ``MultimodalLM.encoders[name]``:
the MoRA layers peft puts into it are the ones the media path runs, and the adapter checkpoint
holds the encoder's and the LLM's MoRA factors side by side (saved once, under the LLM).

The encoder then is no longer frozen in its paired layers: its MoRA factors train, so media are
encoded with gradients, and a feature cache (which stores frozen-encoder outputs) is refused.
"""

from __future__ import annotations

from torch import nn

from mllm.distributed import full_numel
from mllm.encoders.base import MediaEncoder

PAIRED_ENCODER = "paired_encoder"
# Attention projections of LLaMA-family decoders (LLaMA-2/3, Qwen2/2.5/3, Mistral). Only the
# query and output projections are square in every such model (grouped-query attention makes
# k_proj / v_proj narrower), and MoRA adapts square projections.
LLM_ATTENTION_PROJECTIONS = ("self_attn.q_proj", "self_attn.o_proj")


def attach(llm: nn.Module, encoder: MediaEncoder) -> None:
    llm.add_module(PAIRED_ENCODER, encoder)


def detach(llm: nn.Module) -> None:
    if PAIRED_ENCODER in llm._modules:
        del llm._modules[PAIRED_ENCODER]


def decoder_layers_path(llm: nn.Module) -> str:
    """The LLM's decoder layer list: its largest ``nn.ModuleList`` (``model.layers`` in LLaMA).
    Sizes count ZeRO-3-partitioned parameters by their full size (``ds_numel``)."""
    candidates = [(sum(full_numel(p) for p in module.parameters()), name)
                  for name, module in llm.named_modules()
                  if isinstance(module, nn.ModuleList) and not name.startswith(PAIRED_ENCODER)]
    if not candidates:
        raise ValueError(f"MoRA: found no decoder layer list in {type(llm).__name__}")
    return max(candidates)[1]


def mora_options(encoder_name: str, encoder: MediaEncoder, llm: nn.Module, options: dict,
                 target_modules) -> tuple[dict, list[str] | str]:
    """MoraConfig fields pairing ``encoder`` (the "vision" branch of eqs 3-4) with the LLM (the
    "text" branch), from the stage-2 tuner options. Returns (options, target_modules).

    Defaults: the last ``num_paired_layers`` layers that compute the encoder's features (with
    LLaVA's ``select_layer=-2`` the last CLIP layer is unused, so pairing it would train nothing)
    pair with the LLM's last layers; the query and output projections of each pair are adapted."""
    options = {k: v for k, v in options.items() if k != "pair_encoder"}
    text_layers = options.setdefault("text_layers", decoder_layers_path(llm))
    options.setdefault("vision_layers", f"{PAIRED_ENCODER}.{encoder.layers_path}")
    options.setdefault("task_type", "CAUSAL_LM")
    if "layer_pairs" not in options:
        k = options.pop("num_paired_layers", 2)
        used, depth = encoder.num_used_layers(), len(llm.get_submodule(text_layers))
        if not 0 < k <= min(used, depth):
            raise ValueError(f"tuner.options.num_paired_layers={k}: the {encoder_name} encoder computes its "
                             f"features with {used} layers and the LLM has {depth}")
        options["layer_pairs"] = [[used - k + i, depth - k + i] for i in range(k)]
    if "inner_pairs" not in options:
        first_text_layer = llm.get_submodule(f"{text_layers}.0")
        missing = [p for p in LLM_ATTENTION_PROJECTIONS if not _has_submodule(first_text_layer, p)]
        if missing:
            raise ValueError(f"MoRA: the LLM's layers have no {missing}; set tuner.options.inner_pairs "
                             f"({{encoder projection path: LLM projection path}}) and tuner.target_modules")
        options["inner_pairs"] = {e: t for e, t in zip(encoder.attention_projections, LLM_ATTENTION_PROJECTIONS)
                                  if e != t}
    if target_modules is None:
        paths = [*options["inner_pairs"].keys(), *options["inner_pairs"].values(), *LLM_ATTENTION_PROJECTIONS]
        target_modules = sorted({path.rsplit(".", 1)[-1] for path in paths})
    return options, target_modules


def _has_submodule(module: nn.Module, path: str) -> bool:
    try:
        module.get_submodule(path)
        return True
    except AttributeError:
        return False
