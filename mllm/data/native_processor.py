"""The media processor of a released vision-language backbone (Qwen2.5-VL, Qwen2-VL, LLaVA-1.5,
``mllm.model.native``): images and videos go through the checkpoint's own processor (its
placeholders, resizing, frame sampling, pixel limits), audio and speech through the project's
encoders as in ``MediaProcessor``. Built from the backbone's ``config.json`` and processor files;
no weights are loaded."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from mllm.config import ModelConfig
from mllm.data.dataset import NATIVE_MEDIA_KEYS, MediaSpec
from mllm.data.media import load_image
from mllm.data.native_video import sample_native_video
from mllm.data.processor import MediaProcessor
from mllm.encoders import build_preprocessor

#: ``model_type`` of a checkpoint's config -> backbone family handled by ``mllm.model.native``.
NATIVE_FAMILIES = {"qwen2_5_vl": "qwen_vl", "qwen2_vl": "qwen_vl", "llava": "llava"}


def _llm_config(config: ModelConfig):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(config.llm, trust_remote_code=config.trust_remote_code)


def native_family(config: ModelConfig) -> str | None:
    """The native backbone family ``model.llm`` names ('qwen_vl', 'llava'), or None for a plain
    causal LM (or a path AutoConfig cannot read: the causal-LM loader reports that)."""
    if not config.llm:
        return None
    try:
        llm_config = _llm_config(config)
    except (OSError, ValueError):
        return None
    return NATIVE_FAMILIES.get(llm_config.model_type)


def native_media_fields(config: ModelConfig) -> set[str]:
    """Record fields the backbone's own vision takes ({'image'}, plus 'video' where its config has
    a video token); empty for a plain causal LM."""
    if native_family(config) is None:
        return set()
    return {"image"} | ({"video"} if getattr(_llm_config(config), "video_token_id", None) is not None else set())


@dataclass
class NativeItem:
    """One image / video through the checkpoint's processor: the ids its placeholder becomes
    (``MediaSpec.item_tokens``) and its tensors (``NATIVE_MEDIA_KEYS``, concatenated over a
    record's items and over a batch by ``MultimodalCollator``)."""

    token_ids: list[int]
    tensors: dict[str, torch.Tensor]


class NativeMediaProcessor(MediaProcessor):
    """``MediaProcessor`` for the project's branches, plus ``<image>`` (and ``<video>`` for Qwen-VL)
    through ``hf_processor``, the checkpoint's own processor (its tokenizer replaced by the one with
    the project's placeholders)."""

    def __init__(self, config: ModelConfig, tokenizer, preprocessors, hf_processor, family: str,
                 feature_caches: dict | None = None):
        super().__init__(config, tokenizer, preprocessors, feature_caches)
        hf_processor.tokenizer = tokenizer
        self.hf_processor = hf_processor
        self.family = family
        self.native_fields = ("image", "video") if family == "qwen_vl" else ("image",)

    @classmethod
    def from_config(cls, config: ModelConfig, tokenizer=None, hf_processor=None) -> "NativeMediaProcessor":
        from transformers import AutoProcessor, AutoTokenizer

        if tokenizer is None:
            tokenizer = AutoTokenizer.from_pretrained(config.tokenizer or config.llm,
                                                      trust_remote_code=config.trust_remote_code)
        if hf_processor is None:
            hf_processor = AutoProcessor.from_pretrained(config.llm, trust_remote_code=config.trust_remote_code)
        family = NATIVE_FAMILIES[_llm_config(config).model_type]
        preprocessors = {name: build_preprocessor(enc) for name, enc in config.encoders.items()}
        return cls(config, tokenizer, preprocessors, hf_processor, family)

    def media_specs(self) -> dict[str, MediaSpec]:
        """The new branches' specs, plus the native fields: each placeholder becomes exactly the ids
        the checkpoint's processor writes for that item (Qwen-VL: ``<|vision_start|>`` + pads +
        ``<|vision_end|>``; LLaVA: its pads), and the item's tensors are the processor's (pixel
        values, grids, seconds per temporal patch)."""
        specs = super().media_specs()
        for field in self.native_fields:
            placeholder = f"<{field}>"
            specs[placeholder] = MediaSpec(
                placeholder=placeholder, field=field, token_id=self.placeholder_ids[placeholder], num_tokens=0,
                load_item=lambda path, rid, field=field: self.load_native(field, path, rid).tensors,
                item_tokens=lambda path, rid, field=field: self.load_native(field, path, rid).token_ids)
        return specs

    def decode_native(self, field: str, path: str, record_id: str):
        """One image / video file decoded as the checkpoint's processor takes it: an RGB image, or
        ``(frames, VideoMetadata)`` sampled as the released model samples (``native_video``)."""
        if field == "image":
            return load_image(path, record_id)
        return sample_native_video(self.hf_processor.video_processor, path, record_id)

    def process_native(self, field: str, decoded) -> NativeItem:
        """A decoded image / video (``decode_native``) through the checkpoint's processor, with its
        placeholder text: the ids the placeholder becomes and the item's tensors."""
        if field == "image":
            text, media = ("<|vision_start|><|image_pad|><|vision_end|>" if self.family == "qwen_vl"
                           else self.hf_processor.image_token), {"images": [decoded]}
        else:
            # The released model's sampling (decode_native): by frames per second, with the file's
            # real frame count and rate (its time positions); the processor must not sample again.
            frames, metadata = decoded
            text, media = ("<|vision_start|><|video_pad|><|vision_end|>",
                           {"videos": [frames], "video_metadata": [metadata], "do_sample_frames": False})
        out = self.hf_processor(text=[text], add_special_tokens=False, return_tensors="pt", **media)
        return NativeItem(out["input_ids"][0].tolist(),
                          {k: torch.as_tensor(v) for k, v in out.items() if k in NATIVE_MEDIA_KEYS})

    def load_native(self, field: str, path: str, record_id: str) -> NativeItem:
        """One image / video file through the checkpoint's processor."""
        return self.process_native(field, self.decode_native(field, path, record_id))

    def dummy_native(self, kind: str) -> dict[str, torch.Tensor]:
        """A blank image (or two-frame video) through the checkpoint's processor."""
        key = f"native {kind}"
        if key not in self._dummy_media:
            white = Image.new("RGB", (64, 64), "white")
            if kind == "image":
                out = self.hf_processor.image_processor(images=[white], return_tensors="pt")
            else:
                frames = np.stack([np.asarray(white)] * 2)
                out = self.hf_processor.video_processor(videos=[frames], return_tensors="pt")
            self._dummy_media[key] = {k: out[k] for k in NATIVE_MEDIA_KEYS if k in out}
        return self._dummy_media[key]


__all__ = ["NATIVE_FAMILIES", "NativeItem", "NativeMediaProcessor", "native_family", "native_media_fields"]
