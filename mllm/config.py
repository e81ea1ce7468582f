"""The one experiment config schema: ``model``, ``tuner``, ``data`` and ``training`` sections.

A YAML file gives the values; any field can be overridden on the command line as
``section.field=value`` (values parsed as YAML, so ``training.learning_rate=1e-4`` and
``model.encoders.visual.select_layer=-1`` both work). Unknown fields are errors that name the
field, never silently ignored.
"""

from __future__ import annotations

import dataclasses
import enum
import os
import re
import types
import typing
from dataclasses import dataclass, field
from typing import Any

import yaml

from mllm.errors import ConfigError
from mllm.modality import modality_from_name
from mllm.projectors.config import ProjectorConfig


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
    # Speech (Whisper, 30 s per input): the longest clip encoded, in ceil(max_seconds / 30)
    # consecutive 30 s chunks (the last padded with silence), each its own item: every clip
    # gives chunks x the projector's tokens. None = 30 s. Longer audio is trimmed, with a warning.
    max_seconds: float | None = None
    # MokA's placement relative to each clip's length: with T here, the three window values above
    # count in units of len(clip) // T samples (MUSIC-AVQA T = 60, AVE T = 10), each window padded
    # or cut to window_seconds (mllm.data.audio_windows). None: real seconds.
    window_clip_seconds: float | None = None


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
    # Stage-1 output folder (stage 2 starts from it), or released projector files (a path or a list:
    # MokA's visual_pretrain.bin / audio_pretrain.bin, mllm.projectors.released).
    pretrained_projectors: str | list[str] | None = None
    feature_cache: str | None = None       # folder caching the frozen encoders' outputs (None: off)
    # A previous stage-2 output (folder or Hub id) to continue from: model, projectors and adapter
    # load from it and keep training (the next task of a DeLo task sequence, tuner.options.task);
    # the projectors stay frozen. Rules: mllm.train.continuation.
    continue_from: str | None = None
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


@dataclass
class DataConfig:
    # A LLaVA-style JSON / JSONL file, or native sources by type, alone or as a mixture with
    # per-source media_root, count / ratio, replace and seed (mllm.data.mixture).
    train: str | dict | list | None = None
    eval: str | dict | list | None = None
    media_root: str | None = None       # relative media paths resolve against it
    template: str = "auto"              # auto (tokenizer's own, else LLaMA-2-chat) | llama-2 | plain | <jinja>
    system_prompt: str | None = None
    max_length: int | None = None       # default: the LLM's max_position_embeddings
    on_bad_sample: str = "error"        # error | skip (skip and count malformed records / media)
    # Several samples per row, none attending to another (mllm.data.packing); the batch size then
    # counts rows of up to packed_length tokens (default: max_length).
    packing: bool = False
    packed_length: int | None = None
    # Read and tokenise each record when its sample is drawn (mllm.data.lazy); false: tokenise the
    # whole file up front, finding every too-long record before step one.
    lazy: bool = True

    def __post_init__(self):
        if self.on_bad_sample not in ("error", "skip"):
            raise ValueError(f"data.on_bad_sample must be 'error' or 'skip', got {self.on_bad_sample!r}")
        if self.packed_length is not None and self.packed_length < 1:
            raise ValueError(f"data.packed_length must be at least 1, got {self.packed_length}")
        from mllm.data.mixture import is_source_value, parse_sources

        for name in ("train", "eval"):
            if is_source_value(getattr(self, name)):
                parse_sources(getattr(self, name), f"data.{name}")


@dataclass
class ExperimentConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    tuner: TunerConfig = field(default_factory=TunerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    # Fields of mllm.train.MllmTrainingArguments (transformers.TrainingArguments + projector_lr).
    training: dict[str, Any] = field(default_factory=dict)
    source: str | None = None           # the YAML file this came from (relative paths resolve here)


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
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, value in values.items():
        section = known[name].default_factory
        if dataclasses.is_dataclass(section):   # a nested section, e.g. data.train_missing
            kwargs[name] = _build_dataclass(section, value, f"{where}.{name}")
        else:
            kwargs[name] = check_value(f"{where}.{name}", value, hints.get(name))
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where}: {e}") from None


_TRUE_STRINGS, _FALSE_STRINGS = ("true", "yes", "on", "1"), ("false", "no", "off", "0")


def check_value(name: str, value: Any, hint: Any) -> Any:
    """``value`` as the type ``hint`` asks for, or a ConfigError naming the field.

    Checks scalars only (bool, int, float, str, an Enum's values, and unions of them with None);
    lists, mappings and ``Any`` pass through. Numbers written as strings become numbers, and a
    YAML ``no`` (read as False) stands for the string "no" where an Enum accepts it
    (``training.save_strategy: no``)."""
    if hint is None or hint is Any:
        return value
    options = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    if value is None:
        if type(None) in options:
            return None
        raise ConfigError(f"{name}: a value is required, got null")
    if any(typing.get_origin(o) is not None or o in (list, dict, Any) for o in options):
        return value  # a container (or Any) is among the accepted types: not checked here
    enums = [o for o in options if isinstance(o, type) and issubclass(o, enum.Enum)]
    if isinstance(value, bool):
        if bool in options:
            return value
        for enum_type in enums:  # YAML 1.1 reads `no` / `off` as False
            if value is False and "no" in {m.value for m in enum_type}:
                return "no"
    elif isinstance(value, str):
        text = value.strip()
        for enum_type in enums:
            valid = [m.value for m in enum_type]
            if text in valid:
                return text
            if str not in options or len(enums) == 1:
                raise ConfigError(f"{name}={value!r}: expected one of {valid}")
        if str in options:
            return value
        if bool in options and text.lower() in _TRUE_STRINGS + _FALSE_STRINGS:
            return text.lower() in _TRUE_STRINGS
        for number_type in (int, float):
            if number_type in options:
                try:
                    return number_type(text)
                except ValueError:
                    pass
    elif isinstance(value, (int, float)):
        if float in options or (int in options and isinstance(value, int)):
            return value  # an int is a fine float; kept as written (saved configs stay as given)
        if int in options and float(value).is_integer():
            return int(value)
    names = " or ".join(_type_name(o) for o in options if o is not type(None))
    raise ConfigError(f"{name}={value!r}: expected {names}, got {type(value).__name__}")


def _type_name(hint) -> str:
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        return "one of " + "/".join(str(m.value) for m in hint)
    return {bool: "true/false", int: "an integer", float: "a number", str: "a string"}.get(hint, str(hint))


def _build_model_config(values: dict) -> ModelConfig:
    values = dict(values or {})
    encoders = values.pop("encoders", {}) or {}
    projectors = values.pop("projectors", {}) or {}
    cfg = _build_dataclass(ModelConfig, values, "model")
    for name, enc in encoders.items():
        _check_modality(f"model.encoders.{name}", name)
        cfg.encoders[name.lower()] = _build_dataclass(EncoderConfig, enc, f"model.encoders.{name}")
    for name, proj in projectors.items():
        _check_modality(f"model.projectors.{name}", name)
        cfg.projectors[name.lower()] = _build_dataclass(ProjectorConfig, proj, f"model.projectors.{name}")
    missing = sorted(set(cfg.encoders) - set(cfg.projectors))
    for name in missing:  # an encoder without projector settings gets the defaults
        cfg.projectors[name] = ProjectorConfig()
    extra = sorted(set(cfg.projectors) - set(cfg.encoders))
    if extra:
        raise ConfigError(f"model.projectors: {extra} have no encoder in model.encoders")
    return cfg


def _check_modality(where: str, name: str) -> None:
    try:
        modality_from_name(name)
    except ValueError as e:
        raise ConfigError(f"{where}: {e}") from None


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
    try:
        cfg = config_from_dict(read_raw_config(path, overrides), source=path)
    except ConfigError as e:  # name the file too (a value may also come from an override)
        raise ConfigError(f"{path or 'config'}: {e}") from None
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
    try:
        for name, values in raw.items():
            section = sections[name].default_factory
            if dataclasses.is_dataclass(section):
                built[name] = _build_dataclass(section, values, name)
            elif values is not None and not isinstance(values, dict):
                raise ConfigError(f"{name}: expected a mapping, got {type(values).__name__}")
            else:
                built[name] = {**section(), **(values or {})}   # a free mapping: given keys over the defaults
    except ConfigError as e:  # name the file too (a value may also come from an override)
        raise ConfigError(f"{path or 'config'}: {e}") from None
    return cls(**built)


PATH_RESOLUTION_HELP = (
    "Relative paths: a path starting with './' or '../' resolves against the folder of the config "
    "file; any other relative path (e.g. data/train.jsonl) resolves against the working directory; "
    "a model value that is not a local path is a Hugging Face Hub id (org/name).")


def _resolve_relative_paths(cfg: ExperimentConfig, base: str) -> None:
    """Paths starting with './' or '../' are relative to the YAML file; others (HF ids, absolute
    paths, plain relative paths) are left to the usual resolution from the working directory
    (``PATH_RESOLUTION_HELP``)."""

    def fix(value):
        if isinstance(value, str) and value.startswith(("./", "../")):
            return os.path.normpath(os.path.join(base, value))
        return value

    cfg.model.llm = fix(cfg.model.llm)
    cfg.model.tokenizer = fix(cfg.model.tokenizer)
    projectors = cfg.model.pretrained_projectors
    cfg.model.pretrained_projectors = [fix(p) for p in projectors] if isinstance(projectors, list) else fix(projectors)
    cfg.model.feature_cache = fix(cfg.model.feature_cache)
    cfg.model.continue_from = fix(cfg.model.continue_from)
    for enc in cfg.model.encoders.values():
        enc.path = fix(enc.path)
    from mllm.data.mixture import fix_source_paths

    for name in ("train", "eval"):
        setattr(cfg.data, name, fix_source_paths(getattr(cfg.data, name), fix))
    cfg.data.media_root = fix(cfg.data.media_root)
    if "output_dir" in cfg.training:
        cfg.training["output_dir"] = fix(cfg.training["output_dir"])


def config_to_dict(cfg: ExperimentConfig) -> dict:
    out = dataclasses.asdict(cfg)
    out.pop("source", None)
    return out


def _looks_local(value: str) -> bool:
    """A value meant as a local path rather than a Hub id (``name`` or ``org/name``)."""
    return (os.path.isabs(value) or value.startswith(("./", "../", "~")) or value.count("/") > 1
            or os.sep != "/" and os.sep in value)


def check_local_paths(cfg: ExperimentConfig) -> None:
    """Every local path the config names exists; a ConfigError names the field, the path and how
    it was resolved. Hub ids are left to the Hub (they may be downloaded)."""
    where = f" in {cfg.source}" if cfg.source else ""
    base = os.path.dirname(os.path.abspath(cfg.source)) if cfg.source else None
    how = (f"'./' and '../' paths resolve against the config file's folder {base}, other relative paths "
           f"against the working directory {os.getcwd()}") if base else (
        f"relative to the working directory {os.getcwd()}")
    fields = {"model.llm": cfg.model.llm, "model.tokenizer": cfg.model.tokenizer,
              "model.pretrained_projectors": cfg.model.pretrained_projectors,
              "model.continue_from": cfg.model.continue_from}
    fields.update({f"model.encoders.{name}.path": enc.path for name, enc in cfg.model.encoders.items()})
    for name, values in fields.items():
        for value in values if isinstance(values, (list, tuple)) else [values]:   # projectors: a list of files
            if value and _looks_local(value) and not os.path.exists(os.path.expanduser(value)):
                raise ConfigError(f"{name}{where}: local path not found: "
                                  f"{os.path.abspath(os.path.expanduser(value))} ({how})")
    for name in ("train", "eval"):
        value = getattr(cfg.data, name)
        # A native source or mixture (a mapping or list) names its files itself: mllm.data.mixture checks them.
        if isinstance(value, str) and not os.path.isfile(value):
            raise ConfigError(f"data.{name}{where}: data file not found: {os.path.abspath(value)} ({how})")
    if cfg.data.media_root and not os.path.isdir(cfg.data.media_root):
        raise ConfigError(f"data.media_root{where}: folder not found: {os.path.abspath(cfg.data.media_root)} ({how})")
