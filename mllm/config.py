"""The one experiment config schema: ``model``, ``tuner``, ``data`` and ``training`` sections.

A YAML file gives the values; any field can be overridden on the command line as
``section.field=value`` (values parsed as YAML, so ``training.learning_rate=1e-4`` and
``model.encoders.visual.select_layer=-1`` both work). Unknown fields are errors that name the
field, never silently ignored.
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, field
from typing import Any

import yaml

from mllm.errors import UserError
from mllm.modality import modality_from_name
from mllm.projectors.qformer import ProjectorConfig


@dataclass
class EncoderConfig:
    """A frozen media encoder. ``type`` names an entry of ``mllm.encoders.ENCODER_REGISTRY``."""

    type: str = "clip"
    path: str = "openai/clip-vit-large-patch14"
    # Hidden states to take; None = the encoder's usual choice: CLIP -2 (LLaVA's penultimate
    # layer), BEATs and Whisper -1 (their final output, as MokA / SALMONN use).
    select_layer: int | None = None
    drop_cls: bool = True       # CLIP only (LLaVA: patch tokens, no CLS)
    dtype: str | None = None    # defaults to float32; frozen encoders can run in bfloat16 on GPU
    # Audio / speech: each clip is cut into `num_windows` windows of `window_seconds`, spread
    # evenly over the clip (zero-padded when it is shorter), each encoded as one item.
    # MokA: MUSIC-AVQA 10 x 2 s, AVE 10 x 1 s. None = the whole clip as one window.
    num_windows: int = 1
    window_seconds: float | None = None
    # Fixed placement instead: window i starts at window_offset_seconds + i * window_hop_seconds
    # (MUSIC-AVQA in MokA: 10 x 2 s windows, offset -0.5, hop 6; AVE: 10 x 1 s, offset 0, hop 1).
    window_hop_seconds: float | None = None
    window_offset_seconds: float = 0.0


@dataclass
class ModelConfig:
    llm: str = ""                          # HF id or local path of any AutoModelForCausalLM
    tokenizer: str | None = None           # defaults to `llm`
    dtype: str = "float32"                 # LLM weights: float32 | bfloat16 | float16
    # QLoRA: load the LLM's Linear weights as bitsandbytes 4-bit (nf4 | fp4), computing in `dtype`.
    quantization: str | None = None
    attn_implementation: str | None = None
    trust_remote_code: bool = False        # never on unless asked for
    encoders: dict[str, EncoderConfig] = field(default_factory=dict)        # modality -> encoder
    projectors: dict[str, ProjectorConfig] = field(default_factory=dict)   # modality -> projector
    video_frames: int = 8                  # frames sampled uniformly from each video
    pretrained_projectors: str | None = None  # stage-1 output folder (stage 2 starts from it)
    feature_cache: str | None = None       # folder caching the frozen encoders' outputs (None: off)
    # Native vision-language `llm` (Qwen2.5-VL, LLaVA): stage 2 also trains its own connector.
    train_native_connector: bool = False

    def __post_init__(self):
        if self.quantization not in QUANTIZATIONS:
            raise ValueError(f"model.quantization must be one of {QUANTIZATIONS}, got {self.quantization!r}")


QUANTIZATIONS = (None, "nf4", "fp4")


@dataclass
class TunerConfig:
    """Parameter-efficient tuner inside the LLM (stage 2). ``type: none`` trains projectors only."""

    type: str = "lora"                 # none | lora | dora | moka | mora | delo
    r: int = 8
    alpha: float = 16
    dropout: float = 0.05
    target_modules: list[str] | str | None = None   # default: every Linear of the LLM but lm_head
    options: dict[str, Any] = field(default_factory=dict)  # extra fields for the peft config
    # DeLo task sequences: stage 2 runs once per instruction-tuning task, as task `task` (0-based)
    # of `options.num_tasks`. Task 0 starts a new adapter as usual. Every later task sets
    # `continue_from` to the previous task's stage-2 output (folder or Hub id): model, projectors
    # and adapter (all tasks' pools, routers, query maps, Task-Key Memory) load from it, only task
    # `task`'s parameters train, and the projectors stay frozen (any run with `continue_from`), so
    # every earlier task computes exactly what it did (mllm.tuners.delo.sequence).
    task: int = 0
    continue_from: str | None = None

    def __post_init__(self):
        num_tasks = (self.options or {}).get("num_tasks")
        self.check_task(num_tasks if isinstance(num_tasks, int) else None)

    def check_task(self, num_tasks: int | None = None) -> None:
        """The task fields alone (``num_tasks``: the adapter's, when known); ConfigError naming the field."""
        if isinstance(self.task, bool) or not isinstance(self.task, int) or self.task < 0:
            raise ConfigError(f"tuner.task must be a task index >= 0, got {self.task!r}")
        if (self.task or self.continue_from) and self.type != "delo":
            raise ConfigError(f"tuner.task / tuner.continue_from run stage 2 as one task of a DeLo task "
                              f"sequence; they need tuner.type: delo, not {self.type!r}")
        if num_tasks is not None and self.task >= num_tasks:
            raise ConfigError(f"tuner.task={self.task} is out of range for tuner.options.num_tasks={num_tasks} "
                              f"(tasks 0..{num_tasks - 1})")
        if self.task > 0 and not self.continue_from:
            raise ConfigError(f"tuner.task={self.task} needs tuner.continue_from: the stage-2 output folder of "
                              f"task {self.task - 1}, whose adapter holds the earlier tasks")


@dataclass
class DataConfig:
    train: str | None = None            # LLaVA-style JSON / JSONL
    eval: str | None = None
    media_root: str | None = None       # relative media paths resolve against it
    template: str = "auto"              # auto (tokenizer's own, else LLaMA-2-chat) | llama-2 | plain | <jinja>
    system_prompt: str | None = None
    max_length: int | None = None       # default: the LLM's max_position_embeddings
    on_bad_sample: str = "error"        # error | skip (skip and count malformed records / media)

    def __post_init__(self):
        if self.on_bad_sample not in ("error", "skip"):
            raise ValueError(f"data.on_bad_sample must be 'error' or 'skip', got {self.on_bad_sample!r}")


@dataclass
class ExperimentConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    tuner: TunerConfig = field(default_factory=TunerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    # Fields of mllm.train.MllmTrainingArguments (transformers.TrainingArguments + projector_lr).
    training: dict[str, Any] = field(default_factory=dict)
    source: str | None = None           # the YAML file this came from (relative paths resolve here)


class ConfigError(UserError):
    pass


class _YamlLoader(yaml.SafeLoader):
    """SafeLoader that also reads ``1e-4`` as a float (YAML 1.1 wants ``1.0e-4``)."""


_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:\d+\.?\d*|\.\d+)[eE][-+]?\d+$"),
    list("-+0123456789."),
)


def parse_yaml(text: str):
    return yaml.load(text, Loader=_YamlLoader)


def _build_dataclass(cls, values: Any, where: str):
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(values).__name__}")
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ConfigError(f"{where}: unknown field(s) {unknown}; valid fields: {sorted(known)}")
    kwargs = {}
    for name, value in values.items():
        section = known[name].default_factory
        if dataclasses.is_dataclass(section):   # a nested section, e.g. data.train_missing
            value = _build_dataclass(section, value, f"{where}.{name}")
        kwargs[name] = value
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where}: {e}") from None


def _build_model_config(values: dict) -> ModelConfig:
    values = dict(values or {})
    encoders = values.pop("encoders", {}) or {}
    projectors = values.pop("projectors", {}) or {}
    cfg = _build_dataclass(ModelConfig, values, "model")
    for name, enc in encoders.items():
        modality_from_name(name)  # validates the key
        cfg.encoders[name.lower()] = _build_dataclass(EncoderConfig, enc, f"model.encoders.{name}")
    for name, proj in projectors.items():
        modality_from_name(name)
        cfg.projectors[name.lower()] = _build_dataclass(ProjectorConfig, proj, f"model.projectors.{name}")
    missing = sorted(set(cfg.encoders) - set(cfg.projectors))
    for name in missing:  # an encoder without projector settings gets the defaults
        cfg.projectors[name] = ProjectorConfig()
    extra = sorted(set(cfg.projectors) - set(cfg.encoders))
    if extra:
        raise ConfigError(f"model.projectors: {extra} have no encoder in model.encoders")
    return cfg


def config_from_dict(raw: dict, source: str | None = None) -> ExperimentConfig:
    raw = dict(raw or {})
    unknown = sorted(set(raw) - {"model", "tuner", "data", "training"})
    if unknown:
        raise ConfigError(f"unknown top-level section(s) {unknown}; valid: model, tuner, data, training")
    training = raw.get("training") or {}
    if not isinstance(training, dict):
        raise ConfigError("training: expected a mapping of TrainingArguments fields")
    return ExperimentConfig(
        model=_build_model_config(raw.get("model") or {}),
        tuner=_build_dataclass(TunerConfig, raw.get("tuner"), "tuner"),
        data=_build_dataclass(DataConfig, raw.get("data"), "data"),
        training=dict(training),
        source=source,
    )


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Apply ``a.b.c=value`` overrides to a nested dict (values parsed as YAML)."""
    raw = _deep_copy(raw)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like section.field=value")
        key, value = item.split("=", 1)
        parts = key.strip().split(".")
        node = raw
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {part!r} is not a section")
        node[parts[-1]] = parse_yaml(value) if value != "" else None
    return raw


def _deep_copy(obj):
    if isinstance(obj, dict):
        return {k: _deep_copy(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_deep_copy(v) for v in obj]
    return obj


def read_raw_config(path: str | None, overrides: list[str] | None = None) -> dict:
    """The YAML file's mapping (``{}`` without a file) with ``section.field=value`` overrides applied."""
    raw: dict = {}
    if path is not None:
        try:
            with open(path) as f:
                raw = parse_yaml(f.read()) or {}
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {path}") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: invalid YAML: {e}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: expected a mapping of sections, got {type(raw).__name__}")
    return apply_overrides(raw, overrides or [])


def load_config(path: str | None, overrides: list[str] | None = None) -> ExperimentConfig:
    """The instruction-tuning stages' config (``model``, ``tuner``, ``data``, ``training``)."""
    cfg = config_from_dict(read_raw_config(path, overrides), source=path)
    _resolve_relative_paths(cfg, os.path.dirname(os.path.abspath(path)) if path else os.getcwd())
    return cfg


def load_sectioned_config(cls, path: str | None, overrides: list[str] | None = None):
    """A stage config whose schema is the dataclass ``cls`` (one field per section, each a dataclass
    or a free mapping), read and checked as :func:`load_config` reads its own: unknown sections and
    fields are errors naming them, ``1e-3`` is a float, overrides are ``section.field=value``."""
    raw = read_raw_config(path, overrides)
    sections = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(sections))
    if unknown:
        raise ConfigError(f"{path or 'config'}: unknown top-level section(s) {unknown}; "
                          f"valid: {', '.join(sections)}")
    built = {}
    for name, values in raw.items():
        section = sections[name].default_factory
        if dataclasses.is_dataclass(section):
            built[name] = _build_dataclass(section, values, name)
        elif values is not None and not isinstance(values, dict):
            raise ConfigError(f"{name}: expected a mapping, got {type(values).__name__}")
        else:
            built[name] = {**section(), **(values or {})}   # a free mapping: given keys over the defaults
    return cls(**built)


def _resolve_relative_paths(cfg: ExperimentConfig, base: str) -> None:
    """Paths starting with './' or '../' are relative to the YAML file; others (HF ids, absolute
    paths, plain relative paths) are left to the usual resolution from the working directory."""

    def fix(value):
        if isinstance(value, str) and value.startswith(("./", "../")):
            return os.path.normpath(os.path.join(base, value))
        return value

    cfg.model.llm = fix(cfg.model.llm)
    cfg.model.tokenizer = fix(cfg.model.tokenizer)
    cfg.model.pretrained_projectors = fix(cfg.model.pretrained_projectors)
    cfg.model.feature_cache = fix(cfg.model.feature_cache)
    cfg.tuner.continue_from = fix(cfg.tuner.continue_from)
    for enc in cfg.model.encoders.values():
        enc.path = fix(enc.path)
    for name in ("train", "eval", "media_root"):
        setattr(cfg.data, name, fix(getattr(cfg.data, name)))
    if "output_dir" in cfg.training:
        cfg.training["output_dir"] = fix(cfg.training["output_dir"])


def config_to_dict(cfg: ExperimentConfig) -> dict:
    out = dataclasses.asdict(cfg)
    out.pop("source", None)
    return out
