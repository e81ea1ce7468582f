"""Tiny random native vision-language backbones, built and saved locally (tests, offline demos).

Each builder writes a folder that loads like a released checkpoint: ``AutoConfig`` names the
family, ``AutoModelForImageTextToText`` loads the weights and ``AutoProcessor`` the processor.
Sizes follow the constraints of each family (M-RoPE sections summing to head_dim / 2, vision
merger output equal to the LM width, processor patch sizes equal to the vision config's).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from mllm.data.tiny_tokenizer import build_tiny_tokenizer

QWEN_VISION_TOKENS = ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")
#: LLaVA-1.5's prompt layout (llava-hf/llava-1.5-7b-hf) for string contents.
LLAVA_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'user' -%}{{- 'USER: ' ~ message['content'] ~ ' ' -}}"
    "{%- else -%}{{- 'ASSISTANT: ' ~ message['content'] ~ '</s>' -}}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- 'ASSISTANT:' -}}{%- endif -%}"
)
DEFAULT_CORPUS = ["What is in the picture? A red square and a blue circle.",
                  "What instrument plays? A violin, then a piano and a guitar.",
                  "Answer the question about the video and the sound in one word."] * 4


def build_tiny_qwen_vl(output_dir: str, family: str = "qwen2_5_vl", corpus: Iterable[str] = DEFAULT_CORPUS,
                       seed: int = 0) -> str:
    """A tiny Qwen2.5-VL (``family="qwen2_5_vl"``) or Qwen2-VL (``"qwen2_vl"``) with its processor."""
    from transformers import (
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2_5_VLProcessor,
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
        Qwen2VLImageProcessor,
        Qwen2VLProcessor,
        Qwen2VLVideoProcessor,
    )

    tokenizer = build_tiny_tokenizer(corpus, style="qwen2", vocab_size=300)
    tokenizer.add_tokens(list(QWEN_VISION_TOKENS), special_tokens=True)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN_VISION_TOKENS}
    text = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=len(tokenizer), max_position_embeddings=512,
                rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 3, 3]},
                bos_token_id=None, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    patch = dict(patch_size=4, spatial_merge_size=2, temporal_patch_size=2)
    if family == "qwen2_5_vl":
        vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, window_size=16,
                      fullatt_block_indexes=[1], out_hidden_size=64, tokens_per_second=2, **patch)
        config_cls, model_cls, processor_cls = Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor
    elif family == "qwen2_vl":
        vision = dict(depth=2, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2, **patch)
        config_cls, model_cls, processor_cls = Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLProcessor
    else:
        raise ValueError(f"unknown Qwen-VL family {family!r}; expected qwen2_5_vl or qwen2_vl")
    config = config_cls(text_config=text, vision_config=vision, image_token_id=ids["<|image_pad|>"],
                        video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
                        vision_end_token_id=ids["<|vision_end|>"], tie_word_embeddings=False)
    torch.manual_seed(seed)
    model_cls(config).save_pretrained(output_dir)
    pixels = {"shortest_edge": 64, "longest_edge": 1024}
    processor = processor_cls(image_processor=Qwen2VLImageProcessor(size=pixels, merge_size=2, **_qwen_patch(patch)),
                              video_processor=Qwen2VLVideoProcessor(size=pixels, merge_size=2, **_qwen_patch(patch)),
                              tokenizer=tokenizer, chat_template=tokenizer.chat_template)
    processor.save_pretrained(output_dir)
    return output_dir


def _qwen_patch(patch: dict) -> dict:
    return {"patch_size": patch["patch_size"], "temporal_patch_size": patch["temporal_patch_size"]}


def build_tiny_llava(output_dir: str, corpus: Iterable[str] = DEFAULT_CORPUS, seed: int = 0) -> str:
    """A tiny LLaVA-1.5 layout (CLIP tower, two-layer MLP projector, LLaMA) with its processor."""
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    tokenizer = build_tiny_tokenizer(corpus, style=None, vocab_size=300)
    tokenizer.add_tokens(["<image>"], special_tokens=True)
    tokenizer.chat_template = LLAVA_CHAT_TEMPLATE
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
                              image_size=32, patch_size=8)
    text = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=len(tokenizer), max_position_embeddings=512,
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id)
    config = LlavaConfig(vision_config=vision, text_config=text,
                         image_token_index=tokenizer.convert_tokens_to_ids("<image>"), image_seq_length=16,
                         vision_feature_layer=-2, vision_feature_select_strategy="default",
                         tie_word_embeddings=False)
    torch.manual_seed(seed)
    LlavaForConditionalGeneration(config).save_pretrained(output_dir)
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    # num_additional_image_tokens=1 (CLS) as in the released processor_config.json: 16 tokens per image.
    LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=8,
                   vision_feature_select_strategy="default", num_additional_image_tokens=1,
                   chat_template=LLAVA_CHAT_TEMPLATE).save_pretrained(output_dir)
    return output_dir
