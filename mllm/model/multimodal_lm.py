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
import os
from typing import Any

import torch
from peft import (
    PeftModel,
    get_peft_model,
    get_peft_model_state_dict,
    prepare_model_for_kbit_training,
    set_peft_model_state_dict,
)
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

from mllm.checkpoint import (
    ADAPTER_DIR,
    MLLM_CONFIG,
    PromptRecord,
    read_mllm_config,
    read_prompt_record,
    write_prompt_record,
)
from mllm.config import ConfigError, ModelConfig, TunerConfig
from mllm.data.processor import MediaProcessor, add_placeholder_tokens, read_model_config
from mllm.distributed import gathered_parameters, local_device, several_ranks
from mllm.encoders import MediaEncoder, build_encoder
from mllm.encoders.cache import FeatureCache
from mllm.modality import MEDIA_INPUT_KEYS, PLACEHOLDERS
from mllm.modality_context import attach_modality_context
from mllm.model import paired_encoder
from mllm.model.packing import packed_lm_kwargs
from mllm.model.splice import MediaCountError, compute_modality_ids, position_ids_from_attention_mask, splice_features
from mllm.projectors import build_projectors, load_projector_weights, save_projectors
from mllm.tuners import apply_tuner, config_capability, merge_refusal, tuner_capability


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
        self.feature_caches = {
            name: FeatureCache(os.path.join(config.feature_cache, name), encoder, config.encoders[name])
            for name, encoder in self.encoders.items()} if config.feature_cache else {}
        # Media -> encoder inputs and token counts (also the placeholder tokens and the pad token).
        self.processor = self._build_processor(tokenizer)
        self.placeholder_ids = self.processor.placeholder_ids
        # How prompts are rendered and generation stops (mllm.checkpoint); training sets it,
        # from_pretrained reads it, save_pretrained writes it.
        self.prompt_record = PromptRecord()
        # Placeholders whose modality has an encoder: only these may appear in inputs.
        self.supported_placeholders = self.processor.supported_placeholders
        self.placeholder_modalities = {self.placeholder_ids[ph]: PLACEHOLDERS[ph][0] for ph in PLACEHOLDERS}
        self.modality_context = attach_modality_context(self.base_llm)

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

    def supports_continuous_batching(self) -> bool:
        """Whether ``mllm serve`` may decode with its own loop, rows joining and leaving a running batch
        between decode steps (``mllm.serve.engine``). That loop feeds the LM 1-D positions that skip
        left padding and keeps no adapter state but the KV cache, so no adapter may carry per-sample
        state from the prompt pass to the decode steps (DeLo's routing)."""
        if not isinstance(self.llm, PeftModel):
            return True
        return not any(config_capability(config, "per_sample_decode_state")
                       for config in self.llm.peft_config.values())

    def freeze_llm(self) -> None:
        self.llm.requires_grad_(False)

    # ------------------------------------------------------------------ media
    # Media whose items have several parts, each encoded like one item: video frames,
    # audio / speech windows. Their tensors are (N, parts, ...).
    MULTI_PART_FIELDS = ("video", "audio", "speech")

    def _build_processor(self, tokenizer) -> MediaProcessor:
        """The data side of this model (``mllm.data.processor``), over its encoders' preprocessors."""
        return MediaProcessor(self.config, tokenizer, {name: enc.preprocessor for name, enc in self.encoders.items()},
                              self.feature_caches)

    # The processor's, kept here because so much calls them on the model.
    def num_media_tokens(self, placeholder: str) -> int:
        return self.processor.num_media_tokens(placeholder)

    def media_specs(self) -> dict:
        return self.processor.media_specs()

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
        """Token embeddings with each placeholder's features spliced in."""
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
                    blank = self.processor.dummy_media(placeholder).to(embeds.device)
                    features = self.encode_media(placeholder, blank)
                    embeds = embeds + 0.0 * features.sum()
                continue
            features = self.encode_media(placeholder, inputs)
            embeds = splice_features(embeds, input_ids, token_id, features, what=placeholder)
        return embeds

    def _prepare_inputs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                        question_mask: torch.Tensor | None, media: dict[str, torch.Tensor | None],
                        segment_ids: torch.Tensor | None = None):
        """Embed text and media, and queue the modality ids (and packed rows' segments) for the
        LM's next forward."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        embeds = self.embed_inputs(input_ids, {k: v for k, v in media.items() if v is not None})
        self.modality_context.set_pending(self.modality_ids(input_ids, attention_mask), question_mask, segment_ids)
        return embeds, attention_mask

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, question_mask: torch.Tensor | None = None,
                image_inputs: torch.Tensor | None = None, video_inputs: torch.Tensor | None = None,
                audio_inputs: torch.Tensor | None = None, speech_inputs: torch.Tensor | None = None,
                segment_ids: torch.Tensor | None = None, **lm_kwargs):
        """``segment_ids``: packed rows (``mllm.data.packing``), each token's sample in its row."""
        embeds, attention_mask = self._prepare_inputs(
            input_ids, attention_mask, question_mask,
            {"image_inputs": image_inputs, "video_inputs": video_inputs,
             "audio_inputs": audio_inputs, "speech_inputs": speech_inputs}, segment_ids)
        if segment_ids is not None:   # samples kept apart by position ids (mllm.model.packing)
            return self.llm(inputs_embeds=embeds, labels=labels,
                            **{**lm_kwargs, **packed_lm_kwargs(self.base_llm.config, segment_ids)})
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
    def activation_checkpointing_enable(self, activation_checkpointing_kwargs: dict | None = None,
                                        every_n_layers: int = 1, offload: bool = False) -> None:
        """transformers' signature: the Trainer calls this when ``training.gradient_checkpointing``."""
        if activation_checkpointing_kwargs is None:
            activation_checkpointing_kwargs = {"use_reentrant": False}
        self.base_llm.activation_checkpointing_enable(activation_checkpointing_kwargs=activation_checkpointing_kwargs,
                                                      every_n_layers=every_n_layers, offload=offload)
        # Reentrant checkpointing needs inputs that require grad; a text-only batch has none.
        self.base_llm.enable_input_require_grads()

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None, **kwargs) -> None:
        """The older name (transformers keeps it as an alias until v6)."""
        self.activation_checkpointing_enable(gradient_checkpointing_kwargs, **kwargs)

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
        config = read_model_config(checkpoint_dir, **overrides)
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
