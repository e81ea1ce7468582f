"""Qwen-VL native video is sampled as the released model samples it: by frames per second, with
the file's real frame count and rate. A ``<video>`` record must give exactly what the checkpoint's
own processor gives for the same file (transformers' PyAV reader, the processor sampling frames
itself), for videos of different durations and for a processor saved with its own rate."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from mllm.data.dataset import MultimodalCollator, MultimodalDataset
from mllm.data.media import MediaError, write_video
from mllm.data.native_video import QWEN_DEFAULT_FPS, sample_native_video
from tests.model.test_native_backbones import build, image, native_dirs  # noqa: F401 (fixture)

QUESTION = "What happens?"
# (frames, fps): 1.5 s and 5 s.
VIDEOS = {"short": (12, 8), "long": (40, 8)}


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    root = tmp_path_factory.mktemp("videos")
    paths = {}
    for name, (count, fps) in VIDEOS.items():
        paths[name] = str(root / f"{name}.mp4")
        write_video(paths[name], [np.asarray(image(100 + k, (32, 48))) for k in range(count)], fps=fps)
    return paths


def _record_batch(model, path, tmp_path):
    data = tmp_path / "data.jsonl"
    data.write_text(json.dumps({"id": "v1", "video": path, "conversations": [
        {"from": "human", "value": f"<video>\n{QUESTION}"}, {"from": "gpt", "value": "A thing."}]}) + "\n")
    dataset = MultimodalDataset(str(data), model.tokenizer, model.media_specs(), template="auto",
                                for_generation=True, progress=False)
    return MultimodalCollator(model.tokenizer.pad_token_id, "left")([dataset[0]])


def _released(model, path, **settings):
    """The checkpoint's processor on the file: transformers' PyAV reader gives every frame with
    the container's metadata, and the processor samples frames itself."""
    from transformers.video_utils import load_video

    frames, metadata = load_video(path, backend="pyav")
    prompt = model.tokenizer.apply_chat_template(
        [{"role": "user", "content": f"<|vision_start|><|video_pad|><|vision_end|>\n{QUESTION}"}],
        tokenize=False, add_generation_prompt=True)
    return model.processor.hf_processor(text=[prompt], videos=[frames], video_metadata=[metadata],
                                        do_sample_frames=True, add_special_tokens=False, return_tensors="pt",
                                        **settings)


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen2_vl"])
def test_video_record_gives_what_the_released_processor_gives(native_dirs, videos, family, tmp_path):
    model = build(native_dirs, family)
    grids = {}
    for name, path in videos.items():
        batch = _record_batch(model, path, tmp_path)
        reference = _released(model, path, fps=QWEN_DEFAULT_FPS)
        assert batch["input_ids"].tolist() == reference["input_ids"].tolist()
        assert batch["video_grid_thw"].tolist() == reference["video_grid_thw"].tolist()
        torch.testing.assert_close(batch["pixel_values_videos"], reference["pixel_values_videos"], rtol=0, atol=0)
        if family == "qwen2_5_vl":
            torch.testing.assert_close(batch["second_per_grid_ts"], torch.as_tensor(reference["second_per_grid_ts"]))
        grids[name] = batch["video_grid_thw"].tolist()[0]
        with torch.no_grad():
            assert torch.isfinite(model(**batch).logits).all()
    # 2 fps: 1.5 s -> 3 frames, raised to Qwen's minimum of 4 (2 temporal patches); 5 s -> 10 frames (5).
    assert grids["short"][0] == 2 and grids["long"][0] == 5
    if family == "qwen2_5_vl":
        # Seconds per temporal patch: 2 frames / the real sampled rate (4 of 12 frames at 8 fps; 2 fps).
        assert [_record_batch(model, videos[n], tmp_path)["second_per_grid_ts"].tolist() for n in VIDEOS] == \
            [[pytest.approx(0.75)], [pytest.approx(1.0)]]


def test_the_checkpoints_own_rate_and_frame_limits_are_used(native_dirs, videos, tmp_path):
    """A checkpoint whose saved video processor names its own rate and frame limit."""
    folder = tmp_path / "qwen-4fps"
    shutil.copytree(native_dirs["qwen2_5_vl"], folder)
    config = json.loads((folder / "processor_config.json").read_text())
    config["video_processor"].update(fps=4.0, max_frames=12)
    (folder / "processor_config.json").write_text(json.dumps(config))
    model = build({**native_dirs, "qwen-4fps": str(folder)}, "qwen-4fps")
    batch = _record_batch(model, videos["long"], tmp_path)
    reference = _released(model, videos["long"], fps=4.0, max_frames=12)
    # 5 s at 4 fps = 20 frames, capped at 12: 6 temporal patches of 24 x 32 pixels.
    assert batch["video_grid_thw"].tolist() == reference["video_grid_thw"].tolist() == [[6, 6, 8]]
    torch.testing.assert_close(batch["pixel_values_videos"], reference["pixel_values_videos"], rtol=0, atol=0)
    torch.testing.assert_close(batch["second_per_grid_ts"], torch.as_tensor(reference["second_per_grid_ts"]))
    assert batch["second_per_grid_ts"].tolist() == [pytest.approx(2 / (12 / 40 * 8))]


def test_a_video_shorter_than_a_temporal_patch_and_a_broken_file(native_dirs, tmp_path):
    model = build(native_dirs, "qwen2_5_vl")
    write_video(tmp_path / "one.mp4", [np.asarray(image(7, (32, 32)))], fps=4)
    frames, metadata = sample_native_video(model.processor.hf_processor.video_processor, str(tmp_path / "one.mp4"))
    assert frames.shape == (1, 32, 32, 3) and metadata.frames_indices == [0]
    (tmp_path / "bad.mp4").write_bytes(b"not a video")
    with pytest.raises(MediaError, match=r"record 'r9'.*bad\.mp4"):
        sample_native_video(model.processor.hf_processor.video_processor, str(tmp_path / "bad.mp4"), "r9")
