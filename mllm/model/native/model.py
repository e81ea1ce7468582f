"""``NativeVisionLM``: a released vision-language model (Qwen2.5-VL, Qwen2-VL, LLaVA-1.5) whose own
vision tower and connector handle images and video, plus the project's new branches (``<audio>``
BEATs, ``<speech>`` Whisper, each with its Q-Former projector) spliced into the same sequence.

Native media go through the checkpoint's own processor (its placeholders, resizing, frame
sampling, pixel limits): the batch carries what that processor returns (``pixel_values``,
``image_grid_thw``, ``pixel_values_videos``, ``video_grid_thw``, ``second_per_grid_ts``) and
``input_ids`` in which each image / video already occupies its expanded pad tokens. The model
embeds the text, writes the native vision features (``get_image_features`` / ``get_video_features``
of the checkpoint) at the pad positions and the new branches' features at their placeholders,
and runs the language model on ``inputs_embeds``.

Positions. Qwen-VL's multimodal rotary positions (``get_rope_index``) follow
``mm_token_type_ids``; this model derives them from ``input_ids`` with image pads 1, video
pads 2 and everything else, the spliced audio / speech rows included, 0 (text: one position
per token on all three axes). Training passes the resulting (3, B, T) positions; ``generate``
passes ``input_ids`` + ``mm_token_type_ids`` + grids so transformers computes the same
positions on the prompt pass and carries the rope offset on every KV-cache decode step.
LLaVA uses plain 1-D positions (left padding skipped), as the project's causal LMs do.
"""

from __future__ import annotations

import dataclasses
import os

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForImageTextToText, AutoProcessor

from mllm.checkpoint import NATIVE_CONNECTOR_FILE
from mllm.config import ModelConfig, TunerConfig
from mllm.data.dataset import NATIVE_MEDIA_KEYS
from mllm.data.native_processor import NATIVE_FAMILIES, NativeMediaProcessor, native_family, native_media_fields
from mllm.distributed import gathered_parameters, several_ranks
from mllm.errors import UserError
from mllm.modality import Modality
from mllm.model.multimodal_lm import MultimodalLM
from mllm.model.splice import MediaCountError, position_ids_from_attention_mask, splice_features
from mllm.tuners import tuner_capability

#: Tuner targets inside the language model only: peft's "all-linear" and suffix lists would also
#: adapt the vision tower (Qwen2.5-VL's vision MLP shares the LM's names, CLIP its q/k/v) and the
#: connector, where tuner layers would see patches without modality ids.
LANGUAGE_MODEL_TARGETS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
#: The native connector of each family (module path under the ``...ForConditionalGeneration``),
#: and the file a stage-2 output keeps it in when it trained.
CONNECTOR_MODULES = {"qwen_vl": "model.visual.merger", "llava": "model.multi_modal_projector"}


class ConnectorCheckpointError(UserError):
    """A saved native connector that does not fit the backbone's."""


class NativeVisionLM(MultimodalLM):
    AUTO_MODEL_CLASS = AutoModelForImageTextToText
    # QLoRA quantises the language model only. The list replaces bitsandbytes' defaults, so it
    # names lm_head too; prefixes match from the start of in-memory module names.
    QUANTIZATION_SKIP_MODULES = ["model.visual", "model.vision_tower", "model.multi_modal_projector", "lm_head"]

    def __init__(self, config: ModelConfig, llm, tokenizer, encoders, projectors):
        super().__init__(config, llm, tokenizer, encoders, projectors)
        self.family = self.processor.family
        self.connector_loaded = False   # load_connector put a trained connector in
        llm_config = llm.config
        image_id = getattr(llm_config, "image_token_id", None)
        if image_id is None:
            image_id = llm_config.image_token_index
        self.native_token_ids = {"image": image_id}
        if getattr(llm_config, "video_token_id", None) is not None:
            self.native_token_ids["video"] = llm_config.video_token_id
        for token_id in self.native_token_ids.values():
            self.placeholder_modalities[token_id] = Modality.VISUAL

    # ------------------------------------------------------------------ tuner and freezing
    def apply_tuner(self, tuner: TunerConfig) -> None:
        if tuner.type not in (None, "none") and tuner_capability(tuner.type, "pairs_with_encoder"):
            raise NotImplementedError(f"{tuner.type} pairs a project encoder's layers with the LLM's; it is not "
                                      f"available on a native vision-language backbone")
        if tuner.target_modules is None:
            tuner = dataclasses.replace(tuner, target_modules=LANGUAGE_MODEL_TARGETS)
        super().apply_tuner(tuner)
        if self.config.train_native_connector:
            # After peft, which freezes everything outside the adapter.
            self.connector().requires_grad_(True)

    def connector(self) -> torch.nn.Module:
        """The checkpoint's own vision -> LM connector (Qwen-VL merger, LLaVA projector)."""
        return self.base_llm.get_submodule(CONNECTOR_MODULES[self.family])

    # ------------------------------------------------------------------ save / load
    @classmethod
    def from_config(cls, config: ModelConfig, tokenizer=None) -> "NativeVisionLM":
        model = super().from_config(config, tokenizer=tokenizer)
        # A stage-2 output that trained the connector holds it beside the projectors.
        if config.pretrained_projectors and isinstance(config.pretrained_projectors, str):
            model.load_connector(config.pretrained_projectors)
        return model

    def connector_is_saved(self) -> bool:
        """The connector differs from the released one: it trains now, or a trained one was loaded.
        Outputs then keep it (``native_connector.safetensors``), else reloading would bring back
        the released connector."""
        return self.connector_loaded or any(p.requires_grad for p in self.connector().parameters())

    def connector_parameters(self) -> dict[str, torch.Tensor]:
        """The connector's tensors by name (as in its ``state_dict``), live, maybe ZeRO-3-partitioned."""
        return dict(self.connector().state_dict(keep_vars=True))

    def connector_state(self) -> dict[str, torch.Tensor]:
        """Full CPU copies of the connector's tensors. Under ZeRO-3 they are gathered: every rank
        must call this."""
        tensors = self.connector_parameters()
        with gathered_parameters(tensors.values()):
            return {name: value.detach().to("cpu", copy=True).contiguous() for name, value in tensors.items()}

    def load_connector(self, folder: str) -> bool:
        """Put ``folder``'s trained connector (if it has one) into this model, also when ZeRO-3 has
        partitioned it (every rank then calls this, and loads the same file). Returns whether
        one was loaded; a file whose keys or shapes differ from the connector raises."""
        path = os.path.join(folder, NATIVE_CONNECTOR_FILE)
        if not os.path.isfile(path):
            return False
        saved = load_file(path)
        live = self.connector_parameters()
        full_shapes = {name: tuple(getattr(t, "ds_shape", t.shape)) for name, t in live.items()}
        missing, unexpected = sorted(set(live) - set(saved)), sorted(set(saved) - set(live))
        misshapen = [(k, tuple(saved[k].shape), full_shapes[k]) for k in saved
                     if k in live and tuple(saved[k].shape) != full_shapes[k]]
        if missing or unexpected or misshapen:
            raise ConnectorCheckpointError(
                f"{path}: does not fit {self.config.llm}'s connector (missing: {missing[:3]}, unexpected: "
                f"{unexpected[:3]}, shapes (saved, model): {misshapen[:3]}); was it trained on another backbone?")
        with gathered_parameters(live.values(), modifier_rank=0), torch.no_grad():
            for name, tensor in live.items():
                tensor.copy_(saved[name].to(tensor.dtype))
        self.connector_loaded = True
        return True

    def save_pretrained(self, output_dir: str, projector_state: dict | None = None,
                        adapter_state: dict | None = None, connector_state: dict | None = None) -> None:
        """As the parent (projectors, adapter, tokenizer, config: the backbone itself is never
        copied, ``model.llm`` names it), plus the native connector when it trained
        (``model.train_native_connector``) or came trained from the folder this model loaded.
        Under ZeRO-3 the caller passes ``connector_state`` gathered on every rank
        (``connector_state()``); without it the connector must not be partitioned."""
        super().save_pretrained(output_dir, projector_state=projector_state, adapter_state=adapter_state)
        if connector_state is None and self.connector_is_saved():
            connector_state = self.connector_state()
        if connector_state:
            empty = [name for name, t in connector_state.items() if t.numel() == 0]
            if empty:   # a partitioned ZeRO-3 slice: never write what would reload as nothing
                raise ValueError(f"native connector tensors {empty[:3]} are empty (ZeRO-3 partitions); "
                                 f"pass connector_state gathered on every rank")
            save_file({k: v.detach().to("cpu").contiguous() for k, v in connector_state.items()},
                      os.path.join(output_dir, NATIVE_CONNECTOR_FILE))

    # ------------------------------------------------------------------ data pipeline
    def supports_continuous_batching(self) -> bool:
        """No: the serving loop's 1-D positions would be wrong for Qwen-VL (3-D rotary positions and a
        rope offset that ``generate`` computes and carries), and LLaVA is served the same way, through
        ``generate``, to keep one path for native backbones."""
        return False

    def _build_processor(self, tokenizer) -> NativeMediaProcessor:
        """Images and videos through the checkpoint's own processor, audio / speech as the parent's."""
        hf_processor = AutoProcessor.from_pretrained(self.config.llm, trust_remote_code=self.config.trust_remote_code)
        preprocessors = {name: enc.preprocessor for name, enc in self.encoders.items()}
        return NativeMediaProcessor(self.config, tokenizer, preprocessors, hf_processor,
                                    NATIVE_FAMILIES[self.llm.config.model_type], self.feature_caches)

    # ------------------------------------------------------------------ inputs
    def _native_positions(self, input_ids: torch.Tensor) -> torch.Tensor:
        return torch.isin(input_ids, torch.tensor(list(self.native_token_ids.values()), device=input_ids.device))

    def mm_token_type_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Qwen-VL token types: image pads 1, video pads 2, all else (audio / speech too) 0."""
        types = torch.zeros_like(input_ids, dtype=torch.int)
        types = types.masked_fill(input_ids == self.native_token_ids["image"], 1)
        if "video" in self.native_token_ids:
            types = types.masked_fill(input_ids == self.native_token_ids["video"], 2)
        return types

    def native_features(self, kind: str, media: dict) -> torch.Tensor | None:
        """The checkpoint's own vision tower + connector output for all images (or videos) of the
        batch, (N_tokens, D) in order of appearance; None when the batch has none."""
        vision = self.base_llm.model
        if kind == "image" and media.get("pixel_values") is not None:
            if self.family == "qwen_vl":
                out = vision.get_image_features(media["pixel_values"], media["image_grid_thw"])
            else:
                out = vision.get_image_features(pixel_values=media["pixel_values"])
            return torch.cat(list(out.pooler_output), dim=0)
        if kind == "video" and media.get("pixel_values_videos") is not None:
            out = vision.get_video_features(media["pixel_values_videos"], media["video_grid_thw"])
            return torch.cat(list(out.pooler_output), dim=0)
        return None

    def embed_inputs(self, input_ids: torch.Tensor, media: dict) -> torch.Tensor:
        native_positions = self._native_positions(input_ids)
        # The parent embeds text and splices the new branches; native pads are embedded as pad
        # tokens there (LLaVA's <image> is also the project's placeholder) and overwritten below.
        branch_media = {k: v for k, v in media.items() if k not in NATIVE_MEDIA_KEYS}
        embeds = super().embed_inputs(input_ids.masked_fill(native_positions, self.tokenizer.pad_token_id),
                                      branch_media)
        for kind, token_id in self.native_token_ids.items():
            features = self.native_features(kind, media)
            if features is None:
                if bool((input_ids == token_id).any()):
                    raise MediaCountError(f"the batch has native {kind} tokens but no {kind} pixel values")
                if several_ranks():
                    # As the parent does for its encoders: every rank runs the vision tower the
                    # same number of times on every step, so ZeRO-3's gathers line up; a blank
                    # item, added times 0, changes nothing.
                    dummy = {k: v.to(embeds.device) for k, v in self.processor.dummy_native(kind).items()}
                    embeds = embeds + 0.0 * self.native_features(kind, dummy).sum()
                continue
            embeds = splice_features(embeds, input_ids, token_id, features[None], what=f"native {kind}")
        return embeds

    def _prepare_native(self, input_ids, attention_mask, question_mask, media):
        if question_mask is not None:
            # Native pads lie inside user turns; only text tokens belong to the question.
            question_mask = question_mask & (self.modality_ids(input_ids) == int(Modality.TEXT))
        return self._prepare_inputs(input_ids, attention_mask, question_mask, media)

    def rope_position_ids(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, media: dict) -> torch.Tensor:
        """Qwen-VL's (3, B, T) multimodal rotary positions, audio / speech counted as text."""
        positions, _ = self.base_llm.model.get_rope_index(
            input_ids, mm_token_type_ids=self.mm_token_type_ids(input_ids),
            image_grid_thw=media.get("image_grid_thw"), video_grid_thw=media.get("video_grid_thw"),
            second_per_grid_ts=media.get("second_per_grid_ts"), attention_mask=attention_mask)
        return positions

    @staticmethod
    def _split_media(kwargs: dict) -> dict:
        media = {k: kwargs.pop(k) for k in NATIVE_MEDIA_KEYS if k in kwargs}
        # The processor's token types call audio rows 3 (or nothing); they are recomputed.
        kwargs.pop("mm_token_type_ids", None)
        return media

    # ------------------------------------------------------------------ forward / generate
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, question_mask: torch.Tensor | None = None,
                audio_inputs: torch.Tensor | None = None, speech_inputs: torch.Tensor | None = None, **kwargs):
        media = self._split_media(kwargs)
        embeds, attention_mask = self._prepare_native(
            input_ids, attention_mask, question_mask,
            {"audio_inputs": audio_inputs, "speech_inputs": speech_inputs, **media})
        if self.family == "qwen_vl":
            position_ids = self.rope_position_ids(input_ids, attention_mask, media)
        else:
            position_ids = position_ids_from_attention_mask(attention_mask)
        return self.llm(inputs_embeds=embeds, attention_mask=attention_mask, labels=labels,
                        position_ids=position_ids, **kwargs)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 question_mask: torch.Tensor | None = None, audio_inputs: torch.Tensor | None = None,
                 speech_inputs: torch.Tensor | None = None, **generate_kwargs) -> torch.Tensor:
        """Generate from (left-padded) prompts; returns only the new tokens, (B, new)."""
        if attention_mask is not None and bool((attention_mask[:, -1] == 0).any()):
            raise ValueError("generate needs left-padded prompts (a prompt ends in padding); "
                             "use the collator with padding_side='left'")
        media = self._split_media(generate_kwargs)
        embeds, attention_mask = self._prepare_native(
            input_ids, attention_mask, question_mask,
            {"audio_inputs": audio_inputs, "speech_inputs": speech_inputs, **media})
        generate_kwargs.setdefault("pad_token_id", self.tokenizer.pad_token_id)
        generate_kwargs.setdefault("eos_token_id", self.tokenizer.eos_token_id)
        if self.family != "qwen_vl":
            return self.llm.generate(inputs_embeds=embeds, attention_mask=attention_mask, **generate_kwargs)
        # Qwen-VL: transformers computes the 3-D positions from input_ids, token types and grids
        # and carries the rope offset across decode steps. The offset is cached on the model:
        # reset it so an earlier batch's never leaks in. Features are spliced already, so no
        # pixel values go in; the new branches' ids (maybe outside the vocabulary) become pads.
        self.base_llm.model.rope_deltas = None
        branch_ids = torch.isin(input_ids, torch.tensor(
            [i for i, m in self.placeholder_modalities.items() if m in (Modality.AUDIO, Modality.SPEECH)],
            device=input_ids.device))
        grids = {k: media[k] for k in ("image_grid_thw", "video_grid_thw", "second_per_grid_ts") if k in media}
        output = self.llm.generate(input_ids=input_ids.masked_fill(branch_ids, self.tokenizer.pad_token_id),
                                   inputs_embeds=embeds, attention_mask=attention_mask,
                                   mm_token_type_ids=self.mm_token_type_ids(input_ids), **grids, **generate_kwargs)
        self.base_llm.model.rope_deltas = None
        return output[:, input_ids.shape[1]:]


__all__ = ["LANGUAGE_MODEL_TARGETS", "NATIVE_FAMILIES", "NATIVE_MEDIA_KEYS", "NativeVisionLM", "native_family",
           "native_media_fields"]
