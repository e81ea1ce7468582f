"""The layout of a run's output folder -- every file and folder name, in one place -- and the
prompt record (how the checkpoint was prompted in training), saved beside its weights.

A stage-1 output holds the projectors, the tokenizer, ``mllm_config.json`` and the prompt record;
a stage-2 output adds the peft adapter in ``adapter/``. ``MultimodalLM.save_pretrained`` /
``from_pretrained`` write and read it, ``mllm push`` publishes ``HUB_FILES`` of it.

Stage 1 and stage 2 write ``prompt_format.json`` into every output (and Trainer checkpoint)
folder: the chat template as resolved (``plain``, ``llama-2`` or the jinja text itself, never
``auto``, whose meaning depends on the tokenizer), the system prompt, and generation defaults
(max new tokens, stop strings and ids, sampling off). Evaluation, the demo, ``mllm chat``,
``mllm serve`` and ``MultimodalLM.generate`` read it, so a model is asked questions in exactly
the format it learned. An explicit option overrides a field (``PromptRecord.overridden``), and
the override is kept in ``overrides``.

Torch-free: only the template module (jinja, no torch) is imported.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from dataclasses import dataclass, field

from mllm.errors import UserError

logger = logging.getLogger(__name__)

# -- the output folder ------------------------------------------------------------------------------
MLLM_CONFIG = "mllm_config.json"          # model section, tuner, placeholder ids: what from_pretrained rebuilds
ADAPTER_DIR = "adapter"                   # the peft adapter, in peft's save_pretrained layout
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PROJECTOR_WEIGHTS = "projectors.safetensors"
PROJECTOR_CONFIG = "projectors.json"
PROMPT_RECORD_FILE = "prompt_format.json"
EXPERIMENT_FILE = "experiment.yaml"       # the resolved config the run trained with
RUN_FINGERPRINT_FILE = "run_fingerprint.json"   # what decides the run's result (mllm.train.run_folder)
TRAINER_STATE_FILE = "trainer_state.json"
NATIVE_CONNECTOR_FILE = "native_connector.safetensors"   # a native backbone's connector, when it trained
# The classification and continual (CMML) stages' outputs.
RESULTS_FILE = "results.json"             # their scores and history
MISSING_TABLES_DIR = "missing_tables"     # the seeded missing-modality tables of each split
TRAINABLE_WEIGHTS = "trainable.safetensors"   # classify: every trained tensor outside the adapter
CMML_HEADS_FILE = "cmml_heads.safetensors"    # CMML: the per-task classifier heads
CMML_META_FILE = "cmml_config.json"           # CMML: which classifier and its settings
#: Files of an output folder that a published model holds (paths relative to the folder).
HUB_FILES = (
    MLLM_CONFIG, PROJECTOR_WEIGHTS, PROJECTOR_CONFIG, EXPERIMENT_FILE, PROMPT_RECORD_FILE, NATIVE_CONNECTOR_FILE,
    f"{ADAPTER_DIR}/adapter_config.json", f"{ADAPTER_DIR}/{ADAPTER_WEIGHTS}",
    "tokenizer*", "special_tokens_map.json", "added_tokens.json", "chat_template.*", "vocab.*", "merges.txt",
    "spiece.model",
)


def read_mllm_config(checkpoint_dir: str) -> dict:
    """The folder's ``mllm_config.json``; FileNotFoundError when it is not an mllm checkpoint."""
    path = os.path.join(checkpoint_dir, MLLM_CONFIG)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{checkpoint_dir}: no {MLLM_CONFIG}; not an mllm checkpoint")
    with open(path) as f:
        return json.load(f)


# -- the prompt record --------------------------------------------------------------------------------
FORMAT_VERSION = 1
#: New tokens when neither the request nor the record says otherwise.
DEFAULT_MAX_NEW_TOKENS = 64


class PromptRecordError(UserError):
    pass


@dataclass
class PromptRecord:
    template: str = "auto"              # plain | llama-2 | jinja text; "auto" only for unrecorded models
    system_prompt: str | None = None
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    stop_strings: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    do_sample: bool = False
    # "recorded" (read from the checkpoint / made by training) or "assumed" (an older checkpoint)
    origin: str = "recorded"
    overrides: dict = field(default_factory=dict)   # field -> value given explicitly at use time

    def overridden(self, **values) -> "PromptRecord":
        """A copy with the given fields replaced (``None`` values are ignored); each is recorded."""
        given = {k: v for k, v in values.items() if v is not None}
        settable = {f.name for f in dataclasses.fields(self)} - {"origin", "overrides"}
        unknown = sorted(set(given) - settable)
        if unknown:
            raise PromptRecordError(f"unknown prompt-record field(s) {unknown}")
        if not given:
            return self
        return dataclasses.replace(self, **given, overrides={**self.overrides, **given})

    def to_dict(self) -> dict:
        return {"format_version": FORMAT_VERSION, **dataclasses.asdict(self)}

    def generation_defaults(self) -> dict:
        """Keyword defaults for ``generate``: max new tokens, sampling, and extra end ids."""
        return {"max_new_tokens": self.max_new_tokens, "do_sample": self.do_sample}


def resolved_template(tokenizer, template: str) -> str:
    """``template`` as training used it: ``plain``, ``llama-2``, or the jinja text ``auto``
    picked (the tokenizer's own template, else the built-in LLaMA-2 one)."""
    from mllm.data.templates import LLAMA2_CHAT_TEMPLATE, resolve_chat_template

    chat_template = resolve_chat_template(tokenizer, template)
    if chat_template is None:
        return "plain"
    if chat_template == LLAMA2_CHAT_TEMPLATE:
        return "llama-2"
    return chat_template


def end_of_turn_text(tokenizer, template: str) -> str:
    """What the template writes after an assistant answer (``" </s>"``, ``"<|im_end|>\\n"``...):
    generation stops there."""
    from mllm.data.templates import resolve_chat_template

    chat_template = resolve_chat_template(tokenizer, template)
    if chat_template is None:
        return tokenizer.eos_token or ""
    answer = "MLLMANSWERSENTINEL"
    messages = [{"role": "user", "content": "q"}, {"role": "assistant", "content": answer}]
    try:
        text = tokenizer.apply_chat_template(messages, chat_template=chat_template, tokenize=False)
    except Exception:  # a template that cannot render this probe: no stop text beyond eos
        return ""
    return text[text.find(answer) + len(answer):] if answer in text else ""


def training_prompt_record(tokenizer, template: str, system_prompt: str | None,
                           max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS) -> PromptRecord:
    """The record a training stage writes: its template as resolved, its system prompt, and
    stops at the template's end-of-turn text (as one token when the tokenizer has it as one)."""
    resolved = resolved_template(tokenizer, template)
    end = end_of_turn_text(tokenizer, resolved).strip()
    stop_ids, stop_strings = [], []
    if tokenizer.eos_token_id is not None:
        stop_ids.append(tokenizer.eos_token_id)
    if end and end != tokenizer.eos_token:
        end_ids = tokenizer(end, add_special_tokens=False)["input_ids"]
        if len(end_ids) == 1:
            stop_ids.append(end_ids[0])
        else:
            stop_strings.append(end)
    return PromptRecord(template=resolved, system_prompt=system_prompt if resolved != "plain" else None,
                        max_new_tokens=max_new_tokens, stop_strings=stop_strings,
                        stop_token_ids=sorted(set(stop_ids)))


def write_prompt_record(directory: str, record: PromptRecord) -> str:
    path = os.path.join(directory, PROMPT_RECORD_FILE)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(record.to_dict(), f, indent=2, ensure_ascii=False)
    return path


def read_prompt_record(directory: str) -> PromptRecord:
    """The record in ``directory``; for a checkpoint saved before records existed, what every
    tool assumed until then (template ``auto``, no system prompt, greedy), with a logged note."""
    path = os.path.join(directory, PROMPT_RECORD_FILE)
    if not os.path.isfile(path):
        logger.warning("%s has no %s (saved before checkpoints recorded their prompt format): assuming "
                       "template 'auto' (the tokenizer's chat template, else LLaMA-2), no system prompt, greedy "
                       "decoding, %d new tokens; pass a template / system prompt explicitly if training used "
                       "others", directory, PROMPT_RECORD_FILE, DEFAULT_MAX_NEW_TOKENS)
        return PromptRecord(origin="assumed")
    try:
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise PromptRecordError(f"{path}: not a readable prompt record ({e})") from None
    if not isinstance(raw, dict):
        raise PromptRecordError(f"{path}: expected a JSON object")
    version = raw.pop("format_version", None)
    if version != FORMAT_VERSION:
        raise PromptRecordError(f"{path}: format_version {version!r} is not {FORMAT_VERSION}; "
                                f"a newer mllm wrote it")
    known = {f.name for f in dataclasses.fields(PromptRecord)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise PromptRecordError(f"{path}: unknown field(s) {unknown}")
    return PromptRecord(**raw)


def resolve_bundled_paths(model_section: dict, checkpoint_dir: str) -> dict:
    """A saved ``model`` section with its ``./``-relative paths (an ``mllm export`` folder names
    its LLM and encoders so) resolved against the checkpoint folder."""
    def resolve(path):
        if isinstance(path, str) and path.startswith("./"):
            return os.path.normpath(os.path.join(checkpoint_dir, path))
        return path

    section = dict(model_section, llm=resolve(model_section.get("llm")),
                   tokenizer=resolve(model_section.get("tokenizer")))
    section["encoders"] = {name: dict(enc, path=resolve(enc.get("path")))
                           for name, enc in (model_section.get("encoders") or {}).items()}
    return section


__all__ = ["PROMPT_RECORD_FILE", "PromptRecord", "PromptRecordError", "read_prompt_record", "resolve_bundled_paths",
           "resolved_template", "training_prompt_record", "write_prompt_record"]
