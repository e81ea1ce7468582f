"""Records through the data pipeline on a native backbone: ``<image>`` / ``<video>`` become exactly
what the checkpoint's processor writes, ``<audio>`` the BEATs branch's tokens, and the batch runs
through the model as the released model's own processor output does."""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import shutil

import numpy as np
import pytest
import torch
from transformers import AutoModelForImageTextToText

from mllm.data.dataset import MultimodalCollator, MultimodalDataset
from mllm.data.media import write_audio, write_video
from mllm.data.native_processor import NativeMediaProcessor
from mllm.data.processor import MediaProcessor
from mllm.data.templates import resolve_chat_template
from tests.model.test_native_backbones import build, image, native_dirs  # noqa: F401 (fixture)

VISION_TEXT = {"qwen2_5_vl": "<|vision_start|><|image_pad|><|vision_end|>", "llava": "<image>"}


def _write(tmp_path, records):
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    return str(path)


@pytest.mark.parametrize("family", ["qwen2_5_vl", "llava"])
def test_image_record_gives_what_the_checkpoints_processor_gives(native_dirs, family, tmp_path):
    model = build(native_dirs, family)
    image(1, (37, 52)).save(tmp_path / "a.png")
    question = "What is in the picture?"
    data = _write(tmp_path, [{"id": "r1", "image": str(tmp_path / "a.png"),
                              "conversations": [{"from": "human", "value": f"<image>\n{question}"},
                                                {"from": "gpt", "value": "A square."}]}])
    template = "auto" if family == "qwen2_5_vl" else model.processor.hf_processor.chat_template
    dataset = MultimodalDataset(data, model.tokenizer, model.media_specs(), template=template,
                                for_generation=True, progress=False)
    batch = MultimodalCollator(model.tokenizer.pad_token_id, "left")([dataset[0]])
    # The released model's way: the chat template around the processor's image text.
    prompt = model.tokenizer.apply_chat_template(
        [{"role": "user", "content": f"{VISION_TEXT[family]}\n{question}"}],
        chat_template=resolve_chat_template(model.tokenizer, template),
        tokenize=False, add_generation_prompt=True)
    reference = model.processor.hf_processor(text=[prompt], images=[image(1, (37, 52))],
                                             add_special_tokens=False, return_tensors="pt")
    assert batch["input_ids"].tolist() == reference["input_ids"].tolist()
    torch.testing.assert_close(batch["pixel_values"], reference["pixel_values"])
    native = AutoModelForImageTextToText.from_pretrained(native_dirs[family]).eval()
    with torch.no_grad():
        diff = (model(**batch).logits - native(**reference).logits).abs().max().item()
    assert diff < 1e-5


def test_video_image_and_audio_record_through_collator_and_model(native_dirs, tmp_path):
    model = build(native_dirs, "qwen2_5_vl", video_frames=4)
    write_video(tmp_path / "v.mp4", [np.asarray(image(20 + f, (32, 32))) for f in range(6)], fps=4)
    image(2).save(tmp_path / "b.png")
    write_audio(tmp_path / "s.wav", (0.3 * np.sin(np.arange(32000) * 0.05)).astype(np.float32), 16000)
    records = [
        {"id": "va", "video": str(tmp_path / "v.mp4"), "audio": str(tmp_path / "s.wav"),
         "conversations": [{"from": "human", "value": "<video>\n<audio>\nWhat plays?"},
                           {"from": "gpt", "value": "A violin."}]},
        {"id": "i", "image": str(tmp_path / "b.png"),
         "conversations": [{"from": "human", "value": "<image>\nColour?"}, {"from": "gpt", "value": "Red."}]},
    ]
    dataset = MultimodalDataset(_write(tmp_path, records), model.tokenizer, model.media_specs(), progress=False)
    batch = MultimodalCollator(model.tokenizer.pad_token_id, "right")([dataset[0], dataset[1]])
    ids = batch["input_ids"]
    assert batch["video_grid_thw"].tolist() == [[2, 8, 8]]
    # 4 of the 6 frames of a 4 fps video: sampled at 4/6 x 4 fps, 2 frames per temporal patch.
    torch.testing.assert_close(batch["second_per_grid_ts"], torch.tensor([2 / (4 / 6 * 4)]))
    assert int((ids == model.native_token_ids["video"]).sum()) == 2 * 8 * 8 // 4
    assert int((ids == model.placeholder_ids["<audio>"]).sum()) == model.num_media_tokens("<audio>")
    assert int((ids == model.native_token_ids["image"]).sum()) == int(batch["image_grid_thw"].prod(-1).sum()) // 4
    # Media positions are never labelled; answers are.
    media = (ids == model.native_token_ids["video"]) | (ids == model.native_token_ids["image"]) \
        | (ids == model.placeholder_ids["<audio>"])
    assert (batch["labels"][media] == -100).all() and (batch["labels"] != -100).any()
    model.train()
    loss = model(**batch).loss
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None for p in model.projectors.parameters() if p.requires_grad)


def test_batched_answers_with_and_without_the_audio_feature_cache(native_dirs, tmp_path):
    """Batched evaluation (mllm.inference.generate_answers, left-padded batches) over image + audio
    prompts gives each prompt the answer it gets alone, and the new branch's feature cache
    changes nothing."""
    from mllm.inference import generate_answers

    records = []
    for k in range(3):
        image(30 + k, (30 + 7 * k, 40)).save(tmp_path / f"{k}.png")
        write_audio(tmp_path / f"{k}.wav",
                    (0.3 * np.sin(np.arange(16000 + 4000 * k) * (0.02 + 0.01 * k))).astype(np.float32), 16000)
        records.append({"id": f"q{k}", "image": str(tmp_path / f"{k}.png"), "audio": str(tmp_path / f"{k}.wav"),
                        "conversations": [{"from": "human", "value": "<image>\n<audio>\n" + "Which one? " * (k + 1)},
                                          {"from": "gpt", "value": "A violin."}]})
    data = _write(tmp_path, records)
    answers = {}
    for cache in (None, str(tmp_path / "cache")):
        model = build(native_dirs, "qwen2_5_vl", {"type": "lora", "options": {"init_lora_weights": False}},
                      feature_cache=cache)
        dataset = MultimodalDataset(data, model.tokenizer, model.media_specs(), for_generation=True, progress=False)
        answers[cache, 3] = generate_answers(model, dataset, batch_size=3, max_new_tokens=5, progress=False)
        answers[cache, 1] = generate_answers(model, dataset, batch_size=1, max_new_tokens=5, progress=False)
    assert answers[None, 3] == answers[None, 1]
    assert answers[str(tmp_path / "cache"), 3] == answers[None, 3] == answers[str(tmp_path / "cache"), 1]
    assert any(answers[None, 3]) and (tmp_path / "cache" / "audio").is_dir()


def test_the_native_processor_builds_without_the_backbones_weights(native_dirs, tmp_path):
    """``MediaProcessor.from_config`` on a native backbone's config: the checkpoint's own processor
    for images and video, BEATs for audio, the same ids and tensors as the model's, with the
    backbone's weight files deleted."""
    model = build(native_dirs, "qwen2_5_vl", video_frames=4)
    backbone = shutil.copytree(native_dirs["qwen2_5_vl"], tmp_path / "backbone")
    for path in glob.glob(f"{backbone}/*.safetensors"):
        os.remove(path)
    processor = MediaProcessor.from_config(dataclasses.replace(model.config, llm=str(backbone)))
    assert isinstance(processor, NativeMediaProcessor) and processor.family == "qwen_vl"
    assert processor.num_media_tokens("<audio>") == model.num_media_tokens("<audio>") == 2 * 4
    write_video(tmp_path / "v.mp4", [np.asarray(image(20 + f, (32, 32))) for f in range(6)], fps=4)
    image(2).save(tmp_path / "b.png")
    write_audio(tmp_path / "s.wav", (0.3 * np.sin(np.arange(32000) * 0.05)).astype(np.float32), 16000)
    files = {"<image>": tmp_path / "b.png", "<video>": tmp_path / "v.mp4", "<audio>": tmp_path / "s.wav"}
    specs, model_specs = processor.media_specs(), model.processor.media_specs()
    assert sorted(specs) == sorted(model_specs) == sorted(files)
    for placeholder, path in files.items():
        ours, theirs = specs[placeholder], model_specs[placeholder]
        if ours.item_tokens is not None:
            assert ours.item_tokens(str(path), "r") == theirs.item_tokens(str(path), "r")
        got, want = ours.load_item(str(path), "r"), theirs.load_item(str(path), "r")
        if isinstance(want, dict):
            assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want), placeholder
        else:
            assert torch.equal(got, want), placeholder
    assert torch.equal(processor.dummy_native("video")["video_grid_thw"],
                       model.processor.dummy_native("video")["video_grid_thw"])
