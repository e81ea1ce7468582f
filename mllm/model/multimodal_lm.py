"""``MultimodalLM``: frozen encoders + per-modality projectors spliced into any causal LM.

The forward path is LLaVA's, in the HF style: the data pipeline expands each placeholder
into as many placeholder tokens as its projector emits, the model embeds the text, encodes
the media, writes the projected features at the placeholder positions and runs the LM on
``inputs_embeds``. Placeholder ids may lie outside the LM's vocabulary (the LM is never
resized): they are masked before the embedding lookup and always overwritten.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, NamedTuple

import numpy as np
import torch
from peft import (
    PeftModel,
    get_peft_model,
    get_peft_model_state_dict,
    prepare_model_for_kbit_training,
    set_peft_model_state_dict,
)
from PIL import Image
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

from mllm.checkpoint import (
    ADAPTER_DIR,
    MLLM_CONFIG,
    PromptRecord,
    read_mllm_config,
    read_prompt_record,
    resolve_bundled_paths,
    write_prompt_record,
)
from mllm.config import ConfigError, EncoderConfig, ModelConfig, TunerConfig
from mllm.data.audio_windows import clip_relative_windows
from mllm.data.media import (
    AUDIO_SAMPLE_RATE,
    load_audio,
    load_image,
    load_video_frames,
    split_audio_windows,
)
from mllm.data.media_cache import cached_video_loader
from mllm.distributed import gathered_parameters, local_device, several_ranks
from mllm.encoders import MediaEncoder, build_encoder
from mllm.encoders.cache import FeatureCache
from mllm.modality import MEDIA_INPUT_KEYS, PLACEHOLDERS
from mllm.modality_context import attach_modality_context
from mllm.model import paired_encoder
from mllm.model.splice import MediaCountError, compute_modality_ids, position_ids_from_attention_mask, splice_features
from mllm.projectors import build_projectors, load_projector_weights, read_projector_configs, save_projectors
from mllm.tuners import apply_tuner, merge_refusal, tuner_capability


class AudioCut(NamedTuple):
    """Parts one audio / speech clip is cut into (``split_audio_windows``' arguments, in samples)."""

    count: int
    samples: int | None                 # None: the whole clip is one part
    hop: int | None                     # None: parts spread evenly over the clip
    offset: int
    max_seconds: float | None = None    # audio past it is not encoded (chunked speech)


def add_placeholder_tokens(tokenizer) -> dict[str, int]:
    """Add every placeholder as one special token (idempotent); return placeholder -> id."""
    missing = [ph for ph in PLACEHOLDERS if ph not in tokenizer.get_vocab()]
    if missing:
        tokenizer.add_tokens(missing, special_tokens=True)
    return {ph: tokenizer.convert_tokens_to_ids(ph) for ph in PLACEHOLDERS}


def _samples(seconds: float | None) -> int | None:
    return None if seconds is None else round(seconds * AUDIO_SAMPLE_RATE)


def _torch_dtype(name: str | None) -> torch.dtype:
    if name is None:
        return torch.float32
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {name!r}; use float32, bfloat16 or float16")
    return dtype


class MultimodalLM(nn.Module):
    AUTO_MODEL_CLASS = AutoModelForCausalLM   # NativeVisionLM loads vision-language checkpoints
    QUANTIZATION_SKIP_MODULES: list[str] | None = None   # None: bitsandbytes' defaults

    def __init__(self, config: ModelConfig, llm: nn.Module, tokenizer, encoders: dict[str, MediaEncoder],
                 projectors: nn.ModuleDict):
        super().__init__()
        self.config = config
        self.llm = llm
        self.tokenizer = tokenizer
        self.encoders = nn.ModuleDict(encoders)
        self.projectors = projectors
        self.placeholder_ids = add_placeholder_tokens(tokenizer)
        # How prompts are rendered and generation stops (mllm.checkpoint); training sets it,
        # from_pretrained reads it, save_pretrained writes it.
        self.prompt_record = PromptRecord()
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
        # Placeholders whose modality has an encoder: only these may appear in inputs.
        self.supported_placeholders = [ph for ph, (mod, _) in PLACEHOLDERS.items()
                                       if mod.name.lower() in self.encoders]
        self.placeholder_modalities = {self.placeholder_ids[ph]: PLACEHOLDERS[ph][0] for ph in PLACEHOLDERS}
        self.modality_context = attach_modality_context(self.base_llm)
        self._dummy_media: dict[str, torch.Tensor] = {}
        self.feature_caches = {
            name: FeatureCache(os.path.join(config.feature_cache, name), encoder, config.encoders[name])
            for name, encoder in self.encoders.items()} if config.feature_cache else {}

    # ------------------------------------------------------------------ building
    @classmethod
    def from_config(cls, config: ModelConfig, tokenizer=None) -> "MultimodalLM":
        """Build from an experiment's ``model`` section: loads the LLM, tokenizer and encoders
        by HF id or local path, builds projectors and, when ``pretrained_projectors`` is set,
        loads them from a stage-1 checkpoint."""
        config = dataclasses.replace(config,
                                     projectors={k: dataclasses.replace(v) for k, v in config.projectors.items()})
        if not config.llm:
            raise ValueError("model.llm is empty: give an HF id or a local path of a causal LM")
        if cls is MultimodalLM:
            from mllm.model.native.model import NativeVisionLM, native_family
            if native_family(config):  # a vision-language checkpoint with its own vision tower
                return NativeVisionLM.from_config(config, tokenizer=tokenizer)
            if config.train_native_connector:
                raise ConfigError(f"model.train_native_connector: {config.llm} is not a vision-language model "
                                  f"with its own connector (Qwen2.5-VL, Qwen2-VL, LLaVA)")
        if tokenizer is None:
            tokenizer = AutoTokenizer.from_pretrained(config.tokenizer or config.llm,
                                                      trust_remote_code=config.trust_remote_code)
        llm_kwargs: dict[str, Any] = {"dtype": _torch_dtype(config.dtype),
                                      "trust_remote_code": config.trust_remote_code}
        if config.attn_implementation:
            llm_kwargs["attn_implementation"] = config.attn_implementation
        if config.quantization:
            llm_kwargs["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type=config.quantization, bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=llm_kwargs["dtype"], llm_int8_skip_modules=cls.QUANTIZATION_SKIP_MODULES)
            # 4-bit weights are quantized where they load: load them onto this process's device.
            llm_kwargs["device_map"] = {"": local_device()}
        # Loading draws random numbers only when ZeRO-3 creates the modules partitioned; keep
        # it off the global generator so projector and adapter inits depend on the seed alone.
        with torch.random.fork_rng(devices=[]):
            llm = cls.AUTO_MODEL_CLASS.from_pretrained(config.llm, **llm_kwargs)
            encoders = {name: build_encoder(enc) for name, enc in config.encoders.items()}
        if config.quantization:
            # QLoRA's recipe: base frozen, non-quantized weights (norms, embeddings) kept in fp32.
            llm = prepare_model_for_kbit_training(llm, use_gradient_checkpointing=False)
        llm_hidden = llm.config.get_text_config().hidden_size
        for name, proj in config.projectors.items():
            proj.encoder_hidden_size = encoders[name].hidden_size
            proj.llm_hidden_size = llm_hidden
            if proj.output_norm is not None and proj.output_target_norm is None:
                proj.output_target_norm = mean_token_embedding_norm(llm)
        projectors = build_projectors(config.projectors)
        if config.pretrained_projectors:
            load_projector_weights(projectors, config.pretrained_projectors)
        return cls(config, llm, tokenizer, encoders, projectors)

    @property
    def base_llm(self) -> nn.Module:
        """The causal LM itself, under any peft wrapper."""
        return self.llm.get_base_model() if isinstance(self.llm, PeftModel) else self.llm

    def apply_tuner(self, tuner: TunerConfig) -> None:
        """Add the stage-2 tuner. MoRA pairs an encoder with the LLM (``options.pair_encoder``,
        see ``paired_encoder``); every other tuner adapts the LLM alone."""
        peft_tuner = tuner
        if tuner.type not in (None, "none") and tuner_capability(tuner.type, "pairs_with_encoder"):
            name = self._attach_paired_encoder(tuner.options.get("pair_encoder"))
            options, targets = paired_encoder.mora_options(name, self.encoders[name], self.base_llm,
                                                           tuner.options, tuner.target_modules)
            peft_tuner = dataclasses.replace(tuner, options=options, target_modules=targets)
        elif "pair_encoder" in tuner.options:
            raise ValueError(f"tuner.options.pair_encoder is an option of tuners that pair an encoder with the "
                             f"LLM (MoRA); tuner.type {tuner.type!r} does not")
        self.llm = apply_tuner(self.llm, peft_tuner)
        self.tuner_config = tuner

    def _attach_paired_encoder(self, name: str | None) -> str:
        if name not in self.encoders:
            raise ValueError(f"MoRA in the MLLM pairs an encoder's layers with the LLM's: set "
                             f"tuner.options.pair_encoder to one of {sorted(self.encoders)} (got {name!r})")
        if name in self.feature_caches:
            raise ValueError(f"model.feature_cache stores frozen {name} features, but MoRA trains the {name} "
                             f"encoder's paired layers; turn the feature cache off")
        paired_encoder.attach(self.base_llm, self.encoders[name])
        return name

    def merge_tuner(self) -> None:
        """Fold the adapter into the LLM's weights (peft ``merge_and_unload``); ``self.llm`` becomes
        the plain LLM. A 4-bit LLM is dequantized to ``model.dtype`` first: the merged LLM is full
        precision and computes what the QLoRA model computed, since the adapter learned on top of
        the dequantized weights (merging into 4-bit weights would re-quantize W + BA, and a trained
        update is mostly smaller than one NF4 step). Only LoRA / DoRA merge into a quantized LLM;
        tuners whose update depends on the token (MokA, DeLo) never merge and raise."""
        if not isinstance(self.llm, PeftModel):
            raise ValueError("the LLM has no adapter to merge")
        if self.config.quantization:
            peft_config = self.llm.peft_config[self.llm.active_adapter]
            tuner = self.tuner_config.type if self.tuner_config is not None else "lora"
            if not (tuner_capability(tuner, "mergeable") and tuner_capability(tuner, "merges_into_4bit")):
                raise NotImplementedError(f"{tuner} adapters do not merge into a 4-bit LLM "
                                          f"({merge_refusal(tuner) or 'not supported'}); keep the adapter unmerged")
            adapter_state = get_peft_model_state_dict(self.llm)
            base = self.llm.unload()
            # bitsandbytes may keep CPU-repacked 4-bit weights; a state_dict call restores the
            # standard layout that dequantization reads.
            base.state_dict()
            base.dequantize(dtype=_torch_dtype(self.config.dtype))
            self.config.quantization = None
            with torch.random.fork_rng(devices=[]):  # the re-created adapter is overwritten below
                self.llm = get_peft_model(base, peft_config)
            set_peft_model_state_dict(self.llm, adapter_state)
        self.llm = self.llm.merge_and_unload()
        paired_encoder.detach(self.llm)   # its merged layers stay in self.encoders
        self.tuner_config = None

    def freeze_llm(self) -> None:
        self.llm.requires_grad_(False)

    # ------------------------------------------------------------------ media
    # Media whose items have several parts, each encoded like one item: video frames,
    # audio / speech windows. Their tensors are (N, parts, ...).
    MULTI_PART_FIELDS = ("video", "audio", "speech")

    def _parts_per_item(self, placeholder: str) -> int:
        field = PLACEHOLDERS[placeholder][1]
        if field == "video":
            return self.config.video_frames
        if field in ("audio", "speech"):
            return self._audio_cut(placeholder).count
        return 1

    def _window_samples(self, placeholder: str) -> int | None:
        return self._audio_cut(placeholder).samples

    def _audio_cut(self, placeholder: str) -> AudioCut:
        """How one clip of this placeholder is cut into the parts its encoder takes as items.

        An encoder with a fixed input length (Whisper, 30 s) and no windows configured takes
        consecutive chunks of that length up to ``max_seconds`` (one chunk by default): every clip
        gives the same number of chunks, so the placeholder's token count is fixed, and audio past
        the last chunk is trimmed (the data pipeline counts and reports such clips)."""
        cfg = self.config.encoders[PLACEHOLDERS[placeholder][0].name.lower()]
        chunk_seconds = self.encoder_for(placeholder).chunk_seconds
        if chunk_seconds is not None and cfg.window_seconds is None and cfg.num_windows == 1:
            chunk = _samples(chunk_seconds)
            count = 1 if cfg.max_seconds is None else math.ceil(cfg.max_seconds / chunk_seconds)
            return AudioCut(count, chunk, chunk, 0, max_seconds=count * chunk_seconds)
        return AudioCut(cfg.num_windows, _samples(cfg.window_seconds), _samples(cfg.window_hop_seconds),
                        _samples(cfg.window_offset_seconds))

    def num_media_tokens(self, placeholder: str) -> int:
        """How many sequence positions one item of this placeholder occupies."""
        encoder = self.encoder_for(placeholder)
        projector = self.projectors[PLACEHOLDERS[placeholder][0].name.lower()]
        length = encoder.output_length(self._window_samples(placeholder))
        return self._parts_per_item(placeholder) * projector.num_output_tokens(length)

    def media_specs(self) -> dict:
        """Placeholder -> ``MediaSpec`` for the data pipeline, for every modality with an encoder."""
        from mllm.data.dataset import MediaSpec

        specs = {}
        for placeholder in self.supported_placeholders:
            media_field = PLACEHOLDERS[placeholder][1]
            max_seconds = self._audio_cut(placeholder).max_seconds if media_field in ("audio", "speech") else None
            specs[placeholder] = MediaSpec(
                placeholder=placeholder, field=media_field, token_id=self.placeholder_ids[placeholder],
                num_tokens=self.num_media_tokens(placeholder), load_item=self._item_loader(placeholder),
                max_seconds=max_seconds)
        return specs

    def _item_loader(self, placeholder: str):
        """(path, record_id) -> the preprocessed tensor of one item."""
        media_field = PLACEHOLDERS[placeholder][1]
        if media_field == "image":
            return lambda path, rid: self._preprocess_item(placeholder, load_image(path, rid))
        if media_field == "video":
            frames = self.config.video_frames
            load = lambda path, rid: self._preprocess_item(placeholder, load_video_frames(path, frames, rid))  # noqa: E731
            cache = self.feature_caches.get(PLACEHOLDERS[placeholder][0].name.lower())
            # With the feature cache on, a video seen before is not even decoded (keyed on its bytes).
            return cached_video_loader(cache, load, {"video_frames": frames}) if cache else load
        return lambda path, rid: self._preprocess_item(placeholder, load_audio(path, record_id=rid))

    def _preprocess_item(self, placeholder: str, decoded) -> torch.Tensor:
        """A decoded item (image, list of frames, waveform) -> its preprocessed tensor."""
        encoder = self.encoder_for(placeholder)
        media_field = PLACEHOLDERS[placeholder][1]
        if media_field == "image":
            return encoder.preprocess([decoded])[0]
        if media_field == "video":
            return encoder.preprocess(decoded)
        cfg = self.config.encoders[PLACEHOLDERS[placeholder][0].name.lower()]
        cut = self._audio_cut(placeholder)
        if cfg.window_clip_seconds is not None:  # MokA's placement, relative to the clip's length
            return encoder.preprocess(clip_relative_windows(
                decoded, cut.count, cfg.window_seconds, cfg.window_clip_seconds,
                AUDIO_SAMPLE_RATE, cfg.window_hop_seconds, cfg.window_offset_seconds))
        return encoder.preprocess(split_audio_windows(decoded, cut.count, cut.samples, cut.hop, cut.offset))

    def dummy_media(self, placeholder: str) -> torch.Tensor:
        """One blank item (white image or frames, one second of silence) as a batch of one."""
        if placeholder not in self._dummy_media:
            media_field = PLACEHOLDERS[placeholder][1]
            white = Image.new("RGB", (64, 64), "white")
            decoded = {"image": white, "video": [white] * self.config.video_frames}.get(
                media_field, np.zeros(AUDIO_SAMPLE_RATE, dtype=np.float32))
            self._dummy_media[placeholder] = self._preprocess_item(placeholder, decoded)[None]
        return self._dummy_media[placeholder]

    def encoder_for(self, placeholder: str) -> MediaEncoder:
        name = PLACEHOLDERS[placeholder][0].name.lower()
        if name not in self.encoders:
            raise ValueError(f"the model has no {name} encoder, so it cannot take {placeholder}")
        return self.encoders[name]

    def encode_media(self, placeholder: str, inputs: torch.Tensor) -> torch.Tensor:
        """Preprocessed media -> projected features (N, num_media_tokens, llm_hidden)."""
        modality, field = PLACEHOLDERS[placeholder]
        encoder = self.encoder_for(placeholder)
        projector = self.projectors[modality.name.lower()]
        num_items = inputs.shape[0]
        if field in self.MULTI_PART_FIELDS:  # (N, P, ...) -> parts encoded as items
            inputs = inputs.flatten(0, 1)
        cache = self.feature_caches.get(modality.name.lower())
        # Encoders are frozen, except the layers a MoRA adapter pairs with the LLM.
        adapted = any(p.requires_grad for p in encoder.parameters())
        with torch.set_grad_enabled(torch.is_grad_enabled() and adapted):
            features = cache.encode(inputs) if cache else encoder(inputs)
        # No padding mask reaches the projector's cross-attention, on purpose. Speech is padded
        # with silence to 30 s and, as in the official Whisper, SALMONN and MokA, the encoder and
        # the Q-Former attend over all 1500 positions, padded seconds included (a window-level
        # Q-Former window lying wholly in the padding would have nothing to attend to otherwise).
        # Audio windows are equal-length slices zero-padded at the clip's edges, as in MokA.
        projected = projector(features)
        return projected.reshape(num_items, -1, projected.shape[-1])

    # ------------------------------------------------------------------ forward
    def modality_ids(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return compute_modality_ids(input_ids, self.placeholder_modalities, attention_mask)

    def embed_inputs(self, input_ids: torch.Tensor, media: dict[str, torch.Tensor]) -> torch.Tensor:
        is_placeholder = torch.zeros_like(input_ids, dtype=torch.bool)
        for token_id in self.placeholder_modalities:
            is_placeholder |= input_ids == token_id
        embeds = self.llm.get_input_embeddings()(input_ids.masked_fill(is_placeholder, 0))
        for placeholder, (_, field) in PLACEHOLDERS.items():
            inputs = media.get(MEDIA_INPUT_KEYS[field])
            token_id = self.placeholder_ids[placeholder]
            if inputs is None or inputs.shape[0] == 0:
                if bool((input_ids == token_id).any()):
                    raise MediaCountError(f"the batch has {placeholder} positions but no {MEDIA_INPUT_KEYS[field]}")
                if placeholder in self.supported_placeholders and several_ranks():
                    # Every rank runs every encoder and projector on every step, so ZeRO-3's
                    # parameter gathers line up when one rank's batch lacks this media (as LLaVA
                    # and LLaMA-Factory do); a blank item, added times 0, changes nothing.
                    features = self.encode_media(placeholder, self.dummy_media(placeholder).to(embeds.device))
                    embeds = embeds + 0.0 * features.sum()
                continue
            features = self.encode_media(placeholder, inputs)
            embeds = splice_features(embeds, input_ids, token_id, features, what=placeholder)
        return embeds

    def _prepare_inputs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                        question_mask: torch.Tensor | None, media: dict[str, torch.Tensor | None]):
        """Embed text and media, and queue the modality ids for the LM's next forward."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        embeds = self.embed_inputs(input_ids, {k: v for k, v in media.items() if v is not None})
        self.modality_context.set_pending(self.modality_ids(input_ids, attention_mask), question_mask)
        return embeds, attention_mask

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, question_mask: torch.Tensor | None = None,
                image_inputs: torch.Tensor | None = None, video_inputs: torch.Tensor | None = None,
                audio_inputs: torch.Tensor | None = None, speech_inputs: torch.Tensor | None = None,
                **lm_kwargs):
        embeds, attention_mask = self._prepare_inputs(
            input_ids, attention_mask, question_mask,
            {"image_inputs": image_inputs, "video_inputs": video_inputs,
             "audio_inputs": audio_inputs, "speech_inputs": speech_inputs})
        return self.llm(inputs_embeds=embeds, attention_mask=attention_mask, labels=labels,
                        position_ids=position_ids_from_attention_mask(attention_mask), **lm_kwargs)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 question_mask: torch.Tensor | None = None, image_inputs: torch.Tensor | None = None,
                 video_inputs: torch.Tensor | None = None, audio_inputs: torch.Tensor | None = None,
                 speech_inputs: torch.Tensor | None = None, **generate_kwargs) -> torch.Tensor:
        """Generate from (left-padded) prompts; returns only the new tokens, (B, new)."""
        if attention_mask is not None and bool((attention_mask[:, -1] == 0).any()):
            raise ValueError("generate needs left-padded prompts (a prompt ends in padding); "
                             "use the collator with padding_side='left'")
        embeds, attention_mask = self._prepare_inputs(
            input_ids, attention_mask, question_mask,
            {"image_inputs": image_inputs, "video_inputs": video_inputs,
             "audio_inputs": audio_inputs, "speech_inputs": speech_inputs})
        generate_kwargs.setdefault("pad_token_id", self.tokenizer.pad_token_id)
        end_ids = [i for i in self.prompt_record.stop_token_ids if i != self.tokenizer.eos_token_id]
        generate_kwargs.setdefault("eos_token_id", [self.tokenizer.eos_token_id, *end_ids] if end_ids
                                   else self.tokenizer.eos_token_id)
        for key, value in self.prompt_record.generation_defaults().items():
            generate_kwargs.setdefault(key, value)
        return self.llm.generate(inputs_embeds=embeds, attention_mask=attention_mask, **generate_kwargs)

    # ------------------------------------------------------------------ training glue
    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None) -> None:
        if gradient_checkpointing_kwargs is None:
            gradient_checkpointing_kwargs = {"use_reentrant": False}
        self.base_llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs=gradient_checkpointing_kwargs)
        # Reentrant checkpointing needs inputs that require grad; a text-only batch has none.
        self.base_llm.enable_input_require_grads()

    def projector_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.projectors.parameters() if p.requires_grad]

    # ------------------------------------------------------------------ save / load
    def save_pretrained(self, output_dir: str, projector_state: dict | None = None,
                        adapter_state: dict | None = None) -> None:
        """Write projectors, the peft adapter (if any), the tokenizer and ``mllm_config.json``.
        The LLM and encoders are not copied: the config points at them by id or path."""
        os.makedirs(output_dir, exist_ok=True)
        save_projectors(self.projectors, output_dir, state_dict=projector_state)
        if isinstance(self.llm, PeftModel):
            self.llm.save_pretrained(os.path.join(output_dir, ADAPTER_DIR), state_dict=adapter_state)
        self.tokenizer.save_pretrained(output_dir)
        write_prompt_record(output_dir, self.prompt_record)
        model_cfg = dataclasses.asdict(self.config)
        model_cfg["pretrained_projectors"] = None
        model_cfg["feature_cache"] = None  # a folder of this machine
        model_cfg["tokenizer"] = None
        tuner = getattr(self, "tuner_config", None)
        with open(os.path.join(output_dir, MLLM_CONFIG), "w") as f:
            json.dump({"format_version": 1, "model": model_cfg,
                       "tuner": dataclasses.asdict(tuner) if tuner else None}, f, indent=2)

    @classmethod
    def from_pretrained(cls, checkpoint_dir: str, is_trainable: bool = False, revision: str | None = None,
                        **overrides) -> "MultimodalLM":
        """Load a stage-1 or stage-2 output folder (or a Trainer checkpoint inside it), or a model
        published with ``mllm push`` by its Hub id."""
        from mllm.hub import resolve_checkpoint

        checkpoint_dir = resolve_checkpoint(checkpoint_dir, revision=revision)
        saved = read_mllm_config(checkpoint_dir)
        raw = dict(resolve_bundled_paths(saved["model"], checkpoint_dir), **overrides)
        encoders = {k: EncoderConfig(**v) for k, v in raw.pop("encoders").items()}
        projectors = read_projector_configs(checkpoint_dir)
        raw.pop("projectors")
        config = ModelConfig(**raw, encoders=encoders, projectors=projectors)
        tokenizer = AutoTokenizer.from_pretrained(checkpoint_dir, trust_remote_code=config.trust_remote_code)
        config.pretrained_projectors = checkpoint_dir
        model = cls.from_config(config, tokenizer=tokenizer)
        model.config.pretrained_projectors = None
        model.prompt_record = read_prompt_record(checkpoint_dir)
        adapter_dir = os.path.join(checkpoint_dir, ADAPTER_DIR)
        if os.path.isdir(adapter_dir):
            if saved.get("tuner") and tuner_capability(saved["tuner"]["type"], "pairs_with_encoder"):
                model._attach_paired_encoder(saved["tuner"]["options"].get("pair_encoder"))
            model.llm = PeftModel.from_pretrained(model.llm, adapter_dir, is_trainable=is_trainable)
            if saved.get("tuner"):
                # Checkpoints written before task sequences moved to model.continue_from also hold
                # tuner.task / tuner.continue_from; the adapter's own config has what inference needs.
                fields = {f.name for f in dataclasses.fields(TunerConfig)}
                model.tuner_config = TunerConfig(**{k: v for k, v in saved["tuner"].items() if k in fields})
        if not is_trainable:
            model.eval()
            model.requires_grad_(False)
        return model


def mean_token_embedding_norm(llm: nn.Module) -> float:
    """The mean L2 norm of the LLM's input token embeddings (the scale projector outputs with
    ``output_norm`` start at)."""
    weight = llm.get_input_embeddings().weight
    with gathered_parameters([weight]), torch.no_grad():
        return float(f"{float(weight.float().norm(dim=-1).mean()):.6g}")   # 6 digits: readable in the saved config


__all__ = ["MultimodalLM", "add_placeholder_tokens", "mean_token_embedding_norm"]
