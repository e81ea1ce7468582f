"""The tuners under peft's contract (tests/tuners/test_peft_contract.py), one table entry each.

A new tuner gets every contract check by adding one ``Case`` to ``CASES``: how to build its config
(``init_weights`` False gives a visibly non-identity adapter), the tiny base model it adapts, that
model's inputs and output, a module to put in ``modules_to_save``, whether it merges, and, for
tuners that read per-token metadata, what to publish before each forward.

Also imported by the fresh-process half of the contract (``python -m tests.tuners.contract_cases``).
"""

from __future__ import annotations

import json
import sys
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from peft import LoraConfig, PeftConfig
from torch import nn
from torch.utils.checkpoint import checkpoint

import mllm  # noqa: F401  (registers moka, mora and delo with peft)
from mllm.modality_context import set_modality_ids
from mllm.tuners.delo import DeloConfig
from mllm.tuners.moka import MokaConfig
from mllm.tuners.mora import MoraConfig
from tests.tuners.moka_helpers import P, T, V, sample_ids, tiny_llama
from tests.tuners.mora_helpers import clip_inputs, tiny_clip


class TinyMLP(nn.Module):
    """A plain (non-transformers) model: Linear -> ReLU -> Linear -> ReLU -> Linear head.

    ``gradient_checkpointing_enable`` has transformers' signature, so the contract enables it the
    same way on every model; the middle block is then recomputed in backward."""

    def __init__(self):
        super().__init__()
        self.lin0, self.lin1, self.head = nn.Linear(10, 16), nn.Linear(16, 16), nn.Linear(16, 4)
        self.checkpointing: Optional[dict] = None

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: Optional[dict] = None) -> None:
        self.checkpointing = {"use_reentrant": True, **(gradient_checkpointing_kwargs or {})}

    def _middle(self, h: torch.Tensor) -> torch.Tensor:
        return F.relu(self.lin1(h))

    def forward(self, X: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.lin0(X))
        if self.checkpointing is not None and self.training:
            h = checkpoint(self._middle, h, **self.checkpointing)
        else:
            h = self._middle(h)
        return self.head(h)


def tiny_mlp(dtype: torch.dtype = torch.float32) -> TinyMLP:
    torch.manual_seed(0)
    return TinyMLP().to(dtype).eval()


def mlp_inputs() -> dict:
    return {"X": torch.randn(4, 10, generator=torch.Generator().manual_seed(1))}


def llama_inputs() -> dict:
    """Two samples whose tokens stand for visual, audio and text (one left-padded)."""
    ids, _ = sample_ids()
    input_ids = torch.randint(3, 64, ids.shape, generator=torch.Generator().manual_seed(2))
    return {"input_ids": input_ids, "attention_mask": (ids != P).long()}


def publish_media_ids(model: nn.Module) -> None:
    """The per-token modalities and question mask of ``llama_inputs``."""
    ids, question = sample_ids()
    set_modality_ids(model, ids, question)


def publish_row_ids(model: nn.Module) -> None:
    """MokA on 2-D inputs: each row of ``mlp_inputs`` is one token (ids of shape (batch, 1))."""
    set_modality_ids(model, torch.tensor([[T], [V], [T], [V]]))


def clip_embeddings(out: Any) -> torch.Tensor:
    return torch.cat([out.image_embeds, out.text_embeds], dim=-1)


LLAMA_TARGETS = ["q_proj", "v_proj", "down_proj"]


@dataclass(frozen=True)
class Case:
    name: str                                        # the tuner (test ids)
    config: Callable[..., PeftConfig]                # (init_weights, **other fields) -> config
    model: Callable[[torch.dtype], nn.Module]        # a fresh base model, the same weights every call
    inputs: Callable[[], dict]
    output: Callable[[Any], torch.Tensor]            # the model's output -> one tensor
    prefix: str                                      # every adapter parameter's name carries it
    modules_to_save: str                             # a module of the base model to train and save in full
    mergeable: bool = True                           # False: merging is refused with a clear error
    injectable: bool = True                          # False: state on the tuner, so peft's
                                                     # inject_adapter_in_model is refused
    publish: Optional[Callable[[nn.Module], None]] = None   # per-token metadata, before each forward


CASES = [
    Case("lora", lambda init, **kw: LoraConfig(r=4, target_modules=["lin0", "lin1"], init_lora_weights=init, **kw),
         tiny_mlp, mlp_inputs, lambda out: out, "lora_", "head"),
    Case("dora", lambda init, **kw: LoraConfig(r=4, target_modules=["lin0", "lin1"], use_dora=True,
                                               init_lora_weights=init, **kw),
         tiny_mlp, mlp_inputs, lambda out: out, "lora_", "head"),
    Case("moka", lambda init, **kw: MokaConfig(r=4, target_modules=LLAMA_TARGETS,
                                               modalities=["text", "visual", "audio"],
                                               modality_ranks={"audio": 2}, init_weights=init, **kw),
         lambda dtype: tiny_llama(0, dtype=dtype), llama_inputs, lambda out: out.logits, "moka_", "lm_head",
         mergeable=False, publish=publish_media_ids),
    Case("moka_2d", lambda init, **kw: MokaConfig(r=4, target_modules=["lin0", "lin1"], modalities=["text", "visual"],
                                                  init_weights=init, **kw),
         tiny_mlp, mlp_inputs, lambda out: out, "moka_", "head", mergeable=False, publish=publish_row_ids),
    Case("mora", lambda init, **kw: MoraConfig(dropout=0.0, init_weights=init, **kw),
         lambda dtype: tiny_clip(0, dtype=dtype), lambda: clip_inputs(batch=2), clip_embeddings, "mora_",
         "visual_projection", injectable=False),
    Case("delo", lambda init, **kw: DeloConfig(r=2, num_experts=4, target_modules=LLAMA_TARGETS,
                                               init_weights=init, **kw),
         lambda dtype: tiny_llama(0, dtype=dtype), llama_inputs, lambda out: out.logits, "delo_", "lm_head",
         mergeable=False, injectable=False, publish=publish_media_ids),
]
CASE_BY_NAME = {case.name: case for case in CASES}


def cast_inputs(inputs: dict, dtype: torch.dtype) -> dict:
    return {k: v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() else v for k, v in inputs.items()}


def run(case: Case, model: nn.Module, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """One forward of ``model`` on the case's inputs (publishing its metadata first)."""
    if case.publish is not None:
        case.publish(model)
    return case.output(model(**cast_inputs(case.inputs(), dtype)))


def infer(case: Case, model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return run(case, model)


# -- the fresh-process half: load what the test saved, in a process that has seen nothing ------------
def check_fresh(case: Case, folder: str) -> dict:
    """Reload ``folder`` (written by the test: safetensors/ and pickle/, each with the adapter
    "default" and the adapter "other" in other/, and expected.pt) and compare; returns the checks."""
    from peft import PeftModel

    expected = torch.load(f"{folder}/expected.pt", weights_only=True)
    checks = {}
    for kind in ("safetensors", "pickle"):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model = PeftModel.from_pretrained(case.model(torch.float32), f"{folder}/{kind}").eval()
        missing = [str(w.message) for w in caught if "missing adapter keys" in str(w.message).lower()]
        assert not missing, missing
        torch.testing.assert_close(infer(case, model), expected["default"])
        model.load_adapter(f"{folder}/{kind}/other", adapter_name="other")
        model.set_adapter("other")
        torch.testing.assert_close(infer(case, model), expected["other"])
        checks[f"{kind} reload (two adapters, modules_to_save)"] = True
    model = PeftModel.from_pretrained(case.model(torch.float32), f"{folder}/safetensors", low_cpu_mem_usage=True)
    meta = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    assert not meta, meta
    torch.testing.assert_close(infer(case, model.eval()), expected["default"])
    checks["low_cpu_mem_usage reload"] = True
    return checks


def main(root: str, names: list[str]) -> None:
    """One process for every case (imports cost more than the checks): prints one JSON line,
    case name -> {"checks": ..., "error": the traceback or None}."""
    import traceback

    results = {}
    for name in names:
        try:
            results[name] = {"checks": check_fresh(CASE_BY_NAME[name], f"{root}/{name}"), "error": None}
        except Exception:  # reported per case by the test
            results[name] = {"checks": {}, "error": traceback.format_exc()}
    print(json.dumps(results))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
