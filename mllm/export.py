"""``mllm export CHECKPOINT OUT``: one self-contained folder that loads with no network and none
of the original paths.

The folder holds everything ``MultimodalLM.from_pretrained(OUT)`` reads: the LLM (``llm/``), each
encoder's weights in its native format (``encoders/<modality>/``), the projectors, the tokenizer
with the placeholder tokens, the prompt record, ``mllm_config.json`` naming the parts by paths
relative to the folder (``./llm``; resolved against the folder when it loads), the peft adapter
when it is not merged, and a model card (``README.md``).

``--merge`` folds LoRA / DoRA / MoRA into the weights (MoRA into the LLM and its paired encoder).
MokA and DeLo stay adapters: their update depends on each token (MokA routes a token through its
modality's A matrix, DeLo's router mixes experts per sample), so no single weight matrix equals it.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil

from mllm.checkpoint import ADAPTER_DIR, MLLM_CONFIG
from mllm.errors import UserError

logger = logging.getLogger(__name__)

LLM_DIR = "llm"
ENCODERS_DIR = "encoders"


class ExportError(UserError):
    pass


def export_checkpoint(checkpoint: str, out: str, merge: bool = False) -> dict:
    """Write the self-contained folder; returns a summary (what was merged, what stays an adapter)."""
    from mllm.model.multimodal_lm import MultimodalLM

    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise ExportError(f"{out} already exists and is not empty; give a new folder")
    model = MultimodalLM.from_pretrained(checkpoint)
    from mllm.tuners import merge_refusal, tuner_capability

    tuner = model.tuner_config.type if getattr(model, "tuner_config", None) else None
    if tuner in (None, "none"):
        tuner = None
    paired = (model.tuner_config.options.get("pair_encoder")
              if tuner and tuner_capability(tuner, "pairs_with_encoder") else None)
    refusal = merge_refusal(tuner) if tuner else ""
    if merge and refusal:
        raise ExportError(f"--merge: a {tuner} adapter cannot be merged ({refusal}); export "
                          f"without --merge to keep it as an adapter")
    if merge and paired is not None and model.config.encoders[paired].type != "clip":
        raise ExportError(f"--merge: {tuner} merged into a {model.config.encoders[paired].type} encoder cannot be "
                          f"written in that encoder's native format yet; export without --merge")
    merged = False
    if merge and tuner is not None:
        model.merge_tuner()
        merged = True
    os.makedirs(out, exist_ok=True)
    model.save_pretrained(out)   # projectors, adapter (if kept), tokenizer, prompt record, mllm_config.json

    llm_dir = os.path.join(out, LLM_DIR)
    if merged or tuner is None:
        model.llm.save_pretrained(llm_dir)
    else:  # the adapter stays separate: save the LLM as it was before the adapter
        _original_llm(model.config).save_pretrained(llm_dir)
    encoder_paths = {}
    for name, cfg in model.config.encoders.items():
        if merged and name == paired:   # the merge changed this encoder's paired layers (MoRA)
            target = os.path.join(out, ENCODERS_DIR, name)
            model.encoders[name].vision_model.save_pretrained(target)
            model.encoders[name].processor.save_pretrained(target)
            encoder_paths[name] = f"./{ENCODERS_DIR}/{name}"
        else:
            encoder_paths[name] = _copy_encoder(cfg.path, os.path.join(out, ENCODERS_DIR, name), out)

    config_path = os.path.join(out, MLLM_CONFIG)
    with open(config_path) as f:
        saved = json.load(f)
    saved["model"]["llm"] = f"./{LLM_DIR}"
    saved["model"]["tokenizer"] = None
    for name, path in encoder_paths.items():
        saved["model"]["encoders"][name]["path"] = path
    with open(config_path, "w") as f:
        json.dump(saved, f, indent=2)
    summary = {"checkpoint": checkpoint, "tuner": tuner or "none", "merged": merged,
               "adapter": None if merged or tuner is None else f"{ADAPTER_DIR}/",
               "note": refusal or None}
    with open(os.path.join(out, "README.md"), "w", encoding="utf-8") as f:
        f.write(model_card(saved, summary, model.prompt_record))
    return summary


def _original_llm(config):
    import torch
    from transformers import AutoModelForCausalLM

    dtype = getattr(torch, config.dtype) if config.dtype else torch.float32
    return AutoModelForCausalLM.from_pretrained(config.llm, dtype=dtype, trust_remote_code=config.trust_remote_code)


def _copy_encoder(path: str, target: str, out: str) -> str:
    """Copy an encoder's weights (a folder, a single file, or a Hub id from the local cache)."""
    if os.path.isdir(path):
        shutil.copytree(path, target)
        return "./" + os.path.relpath(target, out)
    if os.path.isfile(path):
        os.makedirs(target, exist_ok=True)
        shutil.copy2(path, os.path.join(target, os.path.basename(path)))
        return "./" + os.path.relpath(os.path.join(target, os.path.basename(path)), out)
    from huggingface_hub import snapshot_download

    try:
        local = snapshot_download(path)
    except Exception as e:  # noqa: BLE001 - any hub failure means the same to the user
        raise ExportError(f"encoder {path}: neither a local path nor a downloadable Hub id ({e})") from None
    shutil.copytree(local, target)
    return "./" + os.path.relpath(target, out)


def model_card(saved: dict, summary: dict, record) -> str:
    encoders = ", ".join(f"{name} ({cfg['type']})" for name, cfg in saved["model"]["encoders"].items())
    if summary["merged"]:
        tuning = f"The {summary['tuner']} adapter is merged into the weights (`mllm export --merge`)."
    elif summary["adapter"]:
        tuning = f"The {summary['tuner']} adapter stays separate in `adapter/` (peft; `import mllm` registers it)."
        if summary["note"]:
            tuning += f" It cannot be merged: {summary['note']}."
    else:
        tuning = "No adapter (projector-only checkpoint)."
    system = record.system_prompt if record.system_prompt is not None else "(none)"
    template = record.template if len(record.template) < 40 else "a custom jinja template (see prompt_format.json)"
    return f"""---
library_name: mllm
tags: [multimodal, mllm]
---

# Multimodal model exported by mllm

Exported from `{os.path.basename(os.path.normpath(summary['checkpoint']))}`. Everything it needs is in this folder:

| part | where |
|---|---|
| LLM | `llm/` |
| encoders | `encoders/`: {encoders} |
| projectors | `projectors.safetensors`, `projectors.json` |
| tokenizer (with the `<image>`, `<video>`, `<audio>`, `<speech>` placeholder tokens) | this folder |
| prompt format | `prompt_format.json`: template {template}, system prompt {system} |

{tuning}

```bash
mllm chat THIS_FOLDER
mllm serve THIS_FOLDER --port 8000      # OpenAI-compatible API at http://127.0.0.1:8000/v1, chat page at /
```

```python
from mllm.model import MultimodalLM
model = MultimodalLM.from_pretrained("THIS_FOLDER")
```
"""


def export_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mllm export", description="Write a self-contained folder (LLM, encoders, projectors, tokenizer, prompt "
        "record, adapter or merged weights, model card) that loads with no network and none of the original paths.")
    parser.add_argument("checkpoint", help="stage-1/2 output folder or Hub id")
    parser.add_argument("out", help="new folder to write")
    parser.add_argument("--merge", action="store_true",
                        help="fold a LoRA / DoRA / MoRA adapter into the weights (MokA and DeLo cannot be merged)")
    return parser


def export_main(argv: list[str] | None = None) -> int:
    args = export_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    summary = export_checkpoint(args.checkpoint, args.out, merge=args.merge)
    kept = f"adapter kept in {summary['adapter']}" if summary["adapter"] else "no separate adapter"
    print(f"mllm export: {args.out} (tuner {summary['tuner']}, {'merged' if summary['merged'] else kept})")
    return 0


__all__ = ["ExportError", "export_checkpoint", "export_main", "model_card"]
