"""Released vision-language models (Qwen2.5-VL, Qwen2-VL, LLaVA-1.5) as ``model.llm``, with the
project's audio / speech branches spliced beside their own vision (``NativeVisionLM``).
``MultimodalLM.from_config`` switches to it when the checkpoint's config names such a model."""

from mllm.model.native.model import NATIVE_FAMILIES, NativeVisionLM, native_family, native_media_fields

__all__ = ["NATIVE_FAMILIES", "NativeVisionLM", "native_family", "native_media_fields"]
