"""A conversation with media -> the model's generation inputs, rendered from the prompt record.

Shared by ``mllm serve``, ``mllm chat`` and their tests: messages are ``{"role", "content"}``
with media placeholders (``<image>``...) in the text, media are decoded items per field in the
order their placeholders appear. The prompt is rendered with the checkpoint's own template and
system prompt (``model.prompt_record``), exactly as the training data pipeline renders it.

On a native vision-language backbone (``mllm.model.native``) images and videos go through the
checkpoint's own processor (``NativeMediaProcessor``, as training and ``mllm eval`` prepare them):
an item is a ``NativeItem``, whose placeholder becomes the ids that processor writes (Qwen-VL:
as many pads as its image grid gives) and whose tensors (``pixel_values``, ``image_grid_thw``...)
are concatenated over the prompt and over a batch as the data pipeline does.
"""

from __future__ import annotations

import io
import logging
import os
import re
import tempfile
import threading
from dataclasses import dataclass, field

import torch
from PIL import Image

from mllm.data.dataset import MultimodalCollator, expand_placeholders
from mllm.data.media import AUDIO_SAMPLE_RATE, MediaError, load_audio, load_video_frames
from mllm.data.native_processor import NativeItem
from mllm.data.native_video import read_video_metadata
from mllm.data.templates import tokenize_conversation
from mllm.errors import UserError
from mllm.modality import MEDIA_FIELDS, MEDIA_INPUT_KEYS, PLACEHOLDERS

_PLACEHOLDER_RE = re.compile("|".join(re.escape(p) for p in PLACEHOLDERS))
# Fast tokenizers are not safe to call from several threads at once.
_TOKENIZER_LOCK = threading.Lock()


class InputError(UserError):
    """A request's content the model cannot take; ``kind`` says which limit or rule it broke."""

    def __init__(self, message: str, kind: str = "invalid_request", status: int = 400, param: str | None = None):
        super().__init__(message)
        self.kind, self.status, self.param = kind, status, param


@dataclass
class Limits:
    max_image_pixels: int = 4096 * 4096
    max_audio_seconds: float = 300.0
    max_prompt_tokens: int | None = None     # None: the LLM's context length


@dataclass
class Prompt:
    """One prompt, ready for ``MultimodalCollator``: token ids (media expanded) and media tensors."""

    features: dict[str, torch.Tensor]
    num_tokens: int
    text: str = ""                 # rendered text before media expansion (for logs and tests)
    media_counts: dict[str, int] = field(default_factory=dict)


def placeholder_counts(text: str) -> dict[str, int]:
    counts: dict[str, int] = {}
    for placeholder in _PLACEHOLDER_RE.findall(text):
        field_name = PLACEHOLDERS[placeholder][1]
        counts[field_name] = counts.get(field_name, 0) + 1
    return counts


# --------------------------------------------------------------------------- media


def accepted_fields(processor) -> tuple[str, ...]:
    """Media fields the model takes, in placeholder order: those of its encoders, and a native
    backbone's own image (and video)."""
    taken = processor.media_fields
    return tuple(field_name for field_name in MEDIA_FIELDS if field_name in taken)


def decode_media(processor, field_name: str, data: bytes, what: str, limits: Limits) -> torch.Tensor | NativeItem:
    """Encoded bytes of one image / video / audio / speech item -> its preprocessed tensor, by the
    model's media processor (``model.processor``, ``mllm.data.processor``); a native backbone's
    image or video -> its ``NativeItem``."""
    if field_name not in accepted_fields(processor):
        taken = ", ".join(MEDIA_FIELDS[f] for f in accepted_fields(processor))
        raise InputError(f"{what}: this model has no encoder for {field_name} input (it takes: {taken or 'text only'})",
                         "unsupported_media")
    if field_name in processor.native_fields:
        return _decode_native(processor, field_name, data, what, limits)
    placeholder = MEDIA_FIELDS[field_name]
    if field_name == "image":
        decoded = _decode_image(data, what, limits)
    elif field_name == "video":
        with _temporary_file(data, what) as path:
            decoded = load_video_frames(path, processor.config.video_frames)
        width, height = decoded[0].size
        _check_pixels(width, height, what, limits)
    else:
        with _temporary_file(data, what) as path:
            decoded = load_audio(path)
        seconds = len(decoded) / AUDIO_SAMPLE_RATE
        if seconds > limits.max_audio_seconds:
            raise InputError(f"{what}: audio is {seconds:.1f} s long; this server takes at most "
                             f"{limits.max_audio_seconds:g} s", "audio_too_long")
    return processor.preprocess(placeholder, decoded)


def decode_media_file(processor, field_name: str, path: str, limits: Limits) -> torch.Tensor | NativeItem:
    """A media file on disk -> its preprocessed tensor (the same checks as for bytes)."""
    if not os.path.isfile(path):
        raise MediaError(path, "file not found" if not os.path.exists(path) else "not a regular file")
    with open(path, "rb") as f:
        return decode_media(processor, field_name, f.read(), path, limits)


def _decode_native(processor, field_name: str, data: bytes, what: str, limits: Limits) -> NativeItem:
    """An image or video through the checkpoint's own processor (``NativeMediaProcessor``), as the
    data pipeline reads it from a file; the pixel limit applies to the item as sent."""
    if field_name == "image":
        decoded = _decode_image(data, what, limits)
    else:
        with _temporary_file(data, what) as path:
            metadata = read_video_metadata(path, what)   # the frame size, before any frame is decoded
            _check_pixels(metadata.width, metadata.height, what, limits)
            decoded = processor.decode_native(field_name, path, what)
    with _TOKENIZER_LOCK:   # the checkpoint's processor writes the item's ids with the model's tokenizer
        return processor.process_native(field_name, decoded)


def _decode_image(data: bytes, what: str, limits: Limits) -> Image.Image:
    try:
        with Image.open(io.BytesIO(data)) as image:
            _check_pixels(*image.size, what, limits)   # from the header, before decoding
            image.load()
            return image.convert("RGB")
    except InputError:
        raise
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise MediaError(what, f"not a readable image ({e})") from None


def _check_pixels(width: int, height: int, what: str, limits: Limits) -> None:
    if width * height > limits.max_image_pixels:
        raise InputError(f"{what}: image is {width}x{height} = {width * height} pixels; this server takes at most "
                         f"{limits.max_image_pixels}", "image_too_large")


class _temporary_file:
    """The bytes in a named temporary file (PyAV and soundfile read paths), removed afterwards;
    a MediaError inside names ``what`` (the request part or the user's file), not the temporary file."""

    def __init__(self, data: bytes, what: str):
        self.data, self.what = data, what

    def __enter__(self) -> str:
        handle, self.path = tempfile.mkstemp(prefix="mllm-media-")
        with os.fdopen(handle, "wb") as f:
            f.write(self.data)
        return self.path

    def __exit__(self, kind, error, traceback) -> None:
        os.remove(self.path)
        if isinstance(error, MediaError):
            raise MediaError(self.what, error.reason) from None


# --------------------------------------------------------------------------- prompt


def load_model_for_inference(checkpoint: str, device: str | None = None, template: str | None = None,
                             system_prompt: str | None = None, max_new_tokens: int | None = None):
    """A checkpoint loaded for generation, its prompt record overridden by any option given."""
    import torch

    from mllm.model import MultimodalLM

    model = MultimodalLM.from_pretrained(checkpoint)
    model.to(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model.prompt_record = model.prompt_record.overridden(template=template, system_prompt=system_prompt,
                                                         max_new_tokens=max_new_tokens)
    if model.prompt_record.overrides:
        logging.getLogger(__name__).info("prompt format overridden: %s", model.prompt_record.overrides)
    return model


@dataclass
class PromptContext:
    """What preparing a prompt takes from a model, without its weights: picklable, so that a model
    loaded in another process (``EngineProcess``) can hand it to the server that prepares prompts."""

    processor: object                      # model.processor (MediaProcessor / NativeMediaProcessor)
    tokenizer: object
    prompt_record: object                  # mllm.checkpoint.PromptRecord
    native_token_ids: dict = field(default_factory=dict)   # a native backbone's own pad token ids
    context_length: int | None = None

    @classmethod
    def of(cls, model) -> "PromptContext":
        """The context of a loaded ``MultimodalLM`` (or of a context: itself)."""
        if isinstance(model, PromptContext):
            return model
        return cls(model.processor, model.tokenizer, model.prompt_record, dict(getattr(model, "native_token_ids", {})),
                   getattr(model.base_llm.config.get_text_config(), "max_position_embeddings", None))


def build_prompt(model, messages: list[dict], media: dict[str, list], limits: Limits | None = None,
                 what: str = "request") -> Prompt:
    """Render ``messages`` with the model's prompt record, expand placeholders, attach media.

    ``model``: a loaded ``MultimodalLM`` or its ``PromptContext``.
    ``media`` maps a field (``image``...) to its items (``decode_media``) in placeholder order;
    the placeholder count of each field must equal its item count. Placeholders expand as in the
    training data (``MultimodalDataset``): a fixed count per encoder item, a native item's own ids."""
    limits = limits or Limits()
    model = PromptContext.of(model)
    wanted: dict[str, int] = {}
    for message in messages:
        for field_name, count in placeholder_counts(message["content"]).items():
            wanted[field_name] = wanted.get(field_name, 0) + count
    for field_name in sorted(set(wanted) | set(media)):
        given = len(media.get(field_name, []))
        if wanted.get(field_name, 0) != given:
            raise InputError(f"{what}: the text has {wanted.get(field_name, 0)} {MEDIA_FIELDS[field_name]} "
                             f"placeholder(s) but {given} {field_name} item(s) were attached",
                             "placeholder_mismatch")
    record = model.prompt_record
    try:
        with _TOKENIZER_LOCK:
            tokens = tokenize_conversation(model.tokenizer, messages, record.template, record_id=what,
                                           for_generation=True, system_prompt=record.system_prompt)
    except UserError:
        raise
    except ValueError as e:   # roles out of order, a template that cannot render them ...
        raise InputError(str(e), "invalid_messages") from None
    specs = {spec.token_id: spec for spec in model.processor.media_specs().values()}
    # A native backbone's own pad tokens come only from its processor: typed into the text they
    # would be image / video positions without pixels (and fail the whole batch they join).
    typed = set(model.native_token_ids.values()).difference(specs).intersection(tokens.input_ids)
    if typed:
        names = ", ".join(sorted(model.tokenizer.convert_ids_to_tokens(sorted(typed))))
        raise InputError(f"{what}: the text holds {names}, "
                         f"which only the model's processor writes; put <image> / <video> where media go",
                         "placeholder_mismatch")
    item_tokens = {token_id: [item.token_ids for item in media.get(spec.field, [])]
                   for token_id, spec in specs.items() if spec.item_tokens is not None}
    input_ids, _, question_mask = expand_placeholders(tokens.input_ids, tokens.labels, tokens.question_mask, specs,
                                                      item_tokens)
    limit = limits.max_prompt_tokens or model.context_length
    if limit is not None and len(input_ids) > limit:
        raise InputError(f"{what}: the prompt is {len(input_ids)} tokens (media expanded); this server takes at "
                         f"most {limit}", "prompt_too_long")
    features = {"input_ids": torch.tensor(input_ids), "question_mask": torch.tensor(question_mask, dtype=torch.bool)}
    for field_name, items in media.items():
        if items and isinstance(items[0], NativeItem):   # concatenated, as MultimodalDataset does
            features.update({key: torch.cat([item.tensors[key] for item in items]) for key in items[0].tensors})
        elif items:
            features[MEDIA_INPUT_KEYS[field_name]] = torch.stack(items)
    with _TOKENIZER_LOCK:
        text = model.tokenizer.decode(tokens.input_ids)
    return Prompt(features, len(input_ids), text, {k: len(v) for k, v in media.items()})


def collate_prompts(model, prompts: list[Prompt], device=None) -> dict[str, torch.Tensor]:
    """Left-padded batch of prompts for ``MultimodalLM.generate``."""
    batch = MultimodalCollator(model.tokenizer.pad_token_id, padding_side="left")([p.features for p in prompts])
    if device is not None:
        batch = {k: v.to(device) for k, v in batch.items()}
    return batch


def generate_text(model, prompt: Prompt, **generate_kwargs) -> str:
    """The completion ``MultimodalLM.generate`` gives for one prompt, decoded as the server sends it."""
    batch = collate_prompts(model, [prompt], next(model.parameters()).device)
    new_tokens = model.generate(**batch, **generate_kwargs)[0]
    return model.tokenizer.decode(new_tokens, skip_special_tokens=True).lstrip()


__all__ = ["InputError", "Limits", "Prompt", "PromptContext", "accepted_fields", "build_prompt", "collate_prompts",
           "decode_media", "decode_media_file", "generate_text", "load_model_for_inference", "placeholder_counts"]
