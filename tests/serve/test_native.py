"""`mllm serve` and `mllm chat` on native vision-language backbones (Qwen2.5-VL, LLaVA-1.5 as
``model.llm``): images (and Qwen-VL videos) go through the checkpoint's own processor, as the
training / eval data pipeline prepares them, beside the project's BEATs audio branch."""

from __future__ import annotations

import asyncio
import base64
import io
import json

import httpx
import numpy as np
import openai
import pytest
import torch

from mllm.data.dataset import MultimodalCollator, MultimodalDataset
from mllm.data.media import write_audio, write_video
from mllm.serve.engine import SamplingParams, create_engine
from mllm.serve.inputs import Limits, build_prompt, collate_prompts, decode_media, generate_text
from tests.model.test_native_backbones import build, image, native_dirs  # noqa: F401 (fixture)
from tests.serve.conftest import data_url, in_parallel, run_requests, start_server, wav_bytes

FAMILIES = ("qwen2_5_vl", "llava")
QUESTION = "What is it?"
#: Long enough that only the image's expanded tokens take it past the server's prompt limit.
LONG_QUESTION = "Describe every part of the picture in detail, please. " * 3
MAX_PIXELS = 64 * 64


def png_bytes(seed: int, size: tuple[int, int]) -> bytes:
    out = io.BytesIO()
    image(seed, size).save(out, format="PNG")
    return out.getvalue()


def image_part(png: bytes) -> dict:
    return {"type": "image_url", "image_url": {"url": data_url(png)}}


def audio_part(wav: bytes) -> dict:
    return {"type": "input_audio", "input_audio": {"data": base64.b64encode(wav).decode(), "format": "wav"}}


@pytest.fixture(scope="module", params=FAMILIES)
def native_model(request, native_dirs):  # noqa: F811 (the imported fixture)
    return build(native_dirs, request.param)


def _tokens(model, content: str, media: dict[str, list[bytes]]) -> int:
    items = {f: [decode_media(model.processor, f, data, f, Limits()) for data in datas] for f, datas in media.items()}
    return build_prompt(model, [{"role": "user", "content": content}], items).num_tokens


@pytest.fixture(scope="module")
def native_server(native_model):
    """The family's model served with small limits; the prompt limit lies just under the long
    question with its image expanded."""
    limit = _tokens(native_model, f"<image>\n{LONG_QUESTION}", {"image": [png_bytes(1, (30, 45))]}) - 1
    with start_server(native_model, model_name="native", max_batch_size=4, batch_window_ms=500,
                      limits=Limits(max_image_pixels=MAX_PIXELS, max_prompt_tokens=limit)) as running:
        running.prompt_limit = limit
        yield running


@pytest.fixture
def client(native_server):
    return openai.OpenAI(base_url=f"{native_server.url}/v1", api_key="unused", max_retries=0, timeout=120)


def eval_pipeline_answer(model, tmp_path, media: dict[str, str], question: str, max_tokens: int) -> tuple[str, int]:
    """(answer, prompt tokens) of a record with these media files through ``mllm eval``'s way:
    ``MultimodalDataset`` (for generation), the left-padding collator, ``model.generate``."""
    data = tmp_path / "record.jsonl"
    data.write_text(json.dumps({"id": "q", **media, "conversations": [{"from": "human", "value": question},
                                                                      {"from": "gpt", "value": "-"}]}) + "\n")
    dataset = MultimodalDataset(str(data), model.tokenizer, model.media_specs(), for_generation=True, progress=False)
    batch = MultimodalCollator(model.tokenizer.pad_token_id, "left")([dataset[0]])
    new = model.generate(**batch, max_new_tokens=max_tokens, min_new_tokens=max_tokens, do_sample=False)[0]
    return model.tokenizer.decode(new, skip_special_tokens=True).lstrip(), batch["input_ids"].shape[1]


def test_health_lists_the_native_media(native_server, native_model):
    media = httpx.get(f"{native_server.url}/health").json()["media"]
    assert media == (["image", "video", "audio"] if native_model.family == "qwen_vl" else ["image", "audio"])


def test_image_and_audio_request_equals_the_eval_pipelines_generate(client, native_model, tmp_path):
    png, wav = png_bytes(1, (30, 45)), wav_bytes(1.0, 440)
    (tmp_path / "a.png").write_bytes(png)
    (tmp_path / "a.wav").write_bytes(wav)
    want, prompt_tokens = eval_pipeline_answer(native_model, tmp_path, {"image": str(tmp_path / "a.png"),
                                                                        "audio": str(tmp_path / "a.wav")},
                                               f"<image>\n<audio>\n{QUESTION}", 8)
    assert want.strip()   # a non-empty answer, so equality means something
    response = client.chat.completions.create(
        model="native", max_tokens=8, extra_body={"min_tokens": 8},
        messages=[{"role": "user", "content": [image_part(png), audio_part(wav), {"type": "text", "text": QUESTION}]}])
    assert response.choices[0].message.content == want
    # The image counts with all its tokens (Qwen-VL: as many as its grid gives).
    assert response.usage.prompt_tokens == prompt_tokens


def test_video_request_equals_the_eval_pipelines_generate(client, native_model, tmp_path):
    if native_model.family != "qwen_vl":
        with pytest.raises(openai.BadRequestError, match="no encoder for video input"):
            client.chat.completions.create(model="native", max_tokens=4, messages=[{"role": "user", "content": [
                {"type": "video_url", "video_url": {"url": data_url(b"\0", "video/mp4")}}]}])
        return
    write_video(tmp_path / "clip.mp4", [np.asarray(image(20 + f, (32, 32))) for f in range(6)], fps=4)
    want, prompt_tokens = eval_pipeline_answer(native_model, tmp_path, {"video": str(tmp_path / "clip.mp4")},
                                               "<video>\nWhat happens?", 8)
    response = client.chat.completions.create(
        model="native", max_tokens=8, extra_body={"min_tokens": 8}, messages=[{"role": "user", "content": [
            {"type": "video_url", "video_url": {"url": data_url((tmp_path / "clip.mp4").read_bytes(), "video/mp4")}},
            {"type": "text", "text": "What happens?"}]}])
    assert want.strip() and response.choices[0].message.content == want
    assert response.usage.prompt_tokens == prompt_tokens


def test_rows_with_images_of_different_sizes_batched_together_equal_each_alone(native_model):
    """One ``generate`` call over left-padded rows whose images differ in size (Qwen-VL: in grid and
    token count), one row with two images and audio: every row gets what its prompt gets alone."""
    model = native_model
    items = [decode_media(model.processor, "image", png_bytes(seed, size), f"image {seed}", Limits())
             for seed, size in ((1, (30, 45)), (2, (64, 40)), (3, (44, 60)))]
    audio = decode_media(model.processor, "audio", wav_bytes(1.0, 880), "audio", Limits())
    prompts = [build_prompt(model, [{"role": "user", "content": f"<image>\n<image>\n<audio>\n{QUESTION}"}],
                            {"image": items[:2], "audio": [audio]}),
               build_prompt(model, [{"role": "user", "content": "<image>\nWhich colour is the square here?"}],
                            {"image": items[2:]})]
    assert prompts[0].num_tokens != prompts[1].num_tokens   # one row is left-padded
    if model.family == "qwen_vl":
        grids = [item.tensors["image_grid_thw"].tolist() for item in items]
        assert grids[0] != grids[1] != grids[2]
    engine = create_engine(model, max_batch_size=4, batch_window_s=5.0)
    params = SamplingParams(max_tokens=6, min_tokens=6)

    try:   # announced, as the server does: the batch waits for them
        requests, _ = asyncio.run(run_requests(engine, [(0, prompt, params) for prompt in prompts], announce=True))
    finally:
        engine.close()
    assert engine.batch_sizes == [2]
    for request, prompt in zip(requests, prompts):
        alone = model.generate(**collate_prompts(model, [prompt]), max_new_tokens=6, min_new_tokens=6, do_sample=False)
        assert request.finish_reason == "length" and request.tokens == alone[0].tolist()


def test_concurrent_http_requests_with_different_image_sizes_equal_each_alone(client, native_server, native_model):
    engine = native_server.app.state.engine
    before = len(engine.batch_sizes)
    sizes = [(30, 45), (64, 40), (44, 60), (24, 24)]
    pngs = [png_bytes(10 + k, size) for k, size in enumerate(sizes)]

    def ask(k):
        response = client.chat.completions.create(
            model="native", max_tokens=6, extra_body={"min_tokens": 6}, messages=[{"role": "user", "content": [
                image_part(pngs[k]), {"type": "text", "text": "Which colour? " * (k + 1)}]}])
        return response.choices[0].message.content

    answers, errors = in_parallel(ask, len(sizes))
    assert not errors and max(engine.batch_sizes[before:]) > 1
    for k, png in enumerate(pngs):
        item = decode_media(native_model.processor, "image", png, "image", Limits())
        prompt = build_prompt(native_model, [{"role": "user", "content": "<image>\n" + "Which colour? " * (k + 1)}],
                              {"image": [item]})
        assert answers[k] == generate_text(native_model, prompt, max_new_tokens=6, min_new_tokens=6, do_sample=False)


def _error(client, messages) -> openai.BadRequestError:
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="native", max_tokens=4, messages=messages)
    return caught.value


def test_bad_image_requests_get_400_and_the_server_goes_on(client, native_server, native_model, tmp_path):
    png = png_bytes(1, (30, 45))
    # Two placeholders, one image part; and a placeholder in plain-string content with no image.
    error = _error(client, [{"role": "user", "content": [{"type": "text", "text": "<image> and <image>?"},
                                                         image_part(png)]}])
    assert error.status_code == 400 and error.body["code"] == "placeholder_mismatch"
    assert "2 <image> placeholder(s) but 1 image part(s)" in error.body["message"]
    error = _error(client, [{"role": "user", "content": f"<image>\n{QUESTION}"}])
    assert error.body["code"] == "placeholder_mismatch" and "but 0 image item(s)" in error.body["message"]
    # An image over the pixel limit.
    error = _error(client, [{"role": "user", "content": [image_part(png_bytes(4, (65, 64)))]}])
    assert error.body["code"] == "image_too_large" and f"takes at most {MAX_PIXELS}" in error.body["message"]
    # The prompt limit counts the image's expanded tokens: the text alone would fit.
    limit = native_server.prompt_limit
    assert _tokens(native_model, LONG_QUESTION, {}) < limit - 10
    error = _error(client, [{"role": "user", "content": [image_part(png), {"type": "text", "text": LONG_QUESTION}]}])
    assert error.body["code"] == "prompt_too_long"
    assert f"the prompt is {limit + 1} tokens (media expanded)" in error.body["message"]
    if native_model.family == "qwen_vl":
        # The checkpoint's own image pad typed into the text: an image position without pixels.
        error = _error(client, [{"role": "user", "content": "<|image_pad|> what is this?"}])
        assert error.body["code"] == "placeholder_mismatch" and "<|image_pad|>" in error.body["message"]
        error = _error(client, [{"role": "user", "content": [
            {"type": "video_url", "video_url": {"url": data_url(b"not a video at all", "video/mp4")}}]}])
        assert error.body["code"] == "undecodable_media"
        assert "cannot read messages[0].content[0]" in error.body["message"]
        write_video(tmp_path / "big.mp4", [np.asarray(image(7, (72, 72)))] * 2, fps=2)
        error = _error(client, [{"role": "user", "content": [
            {"type": "video_url", "video_url": {"url": data_url((tmp_path / "big.mp4").read_bytes(), "video/mp4")}}]}])
        assert error.body["code"] == "image_too_large" and "72x72 = 5184 pixels" in error.body["message"]
    assert set(error.body) >= {"message", "type", "param", "code"}   # OpenAI's error shape
    response = client.chat.completions.create(model="native", max_tokens=3, messages=[
        {"role": "user", "content": [image_part(png), {"type": "text", "text": QUESTION}]}])
    assert response.choices[0].finish_reason in ("stop", "length")


def test_chat_with_an_image_on_a_native_backbone_answers(native_model, tmp_path):
    from mllm.chat import chat_main
    from mllm.serve.inputs import decode_media_file, load_model_for_inference

    checkpoint = str(tmp_path / "checkpoint")
    native_model.save_pretrained(checkpoint)
    (tmp_path / "a.png").write_bytes(png_bytes(5, (40, 56)))
    (tmp_path / "b.png").write_bytes(png_bytes(6, (24, 32)))
    write_audio(tmp_path / "c.wav", (0.3 * np.sin(np.arange(16000) * 0.05)).astype(np.float32), 16000)
    script = "\n".join([f"/image {tmp_path / 'a.png'}", f"/audio {tmp_path / 'c.wav'}", QUESTION,
                        f"/image {tmp_path / 'b.png'}", "And this one?", "/quit"]) + "\n"
    stdout = io.StringIO()
    assert chat_main([checkpoint, "--max-new-tokens", "6", "--device", "cpu"], io.StringIO(script), stdout) == 0
    out = stdout.getvalue()
    assert "takes image" in out and "error:" not in out, out
    answers = [line.split("Assistant: ", 1)[1] for line in out.splitlines() if "Assistant: " in line]

    # The same conversation through generate: turn 2 sees turn 1, both images and the audio.
    model = load_model_for_inference(checkpoint, device="cpu")
    images = [decode_media_file(model.processor, "image", str(tmp_path / n), Limits()) for n in ("a.png", "b.png")]
    audio = decode_media_file(model.processor, "audio", str(tmp_path / "c.wav"), Limits())
    turn1 = [{"role": "user", "content": f"<image>\n<audio>\n{QUESTION}"}]
    want1 = generate_text(model, build_prompt(model, turn1, {"image": images[:1], "audio": [audio]}),
                          max_new_tokens=6)
    turn2 = [*turn1, {"role": "assistant", "content": want1}, {"role": "user", "content": "<image>\nAnd this one?"}]
    want2 = generate_text(model, build_prompt(model, turn2, {"image": images, "audio": [audio]}), max_new_tokens=6)
    assert answers == [want1, want2] and any(answers)


def test_prompt_context_crosses_a_process_boundary_and_prepares_the_same_prompt(native_model):
    """`mllm serve`'s engine process pickles the native model's PromptContext to the server process."""
    import pickle

    from mllm.serve.inputs import PromptContext

    context = pickle.loads(pickle.dumps(PromptContext.of(native_model)))
    assert context.native_token_ids == native_model.native_token_ids
    png = png_bytes(3, (40, 24))
    mine, theirs = ([decode_media(source.processor, "image", png, "image", Limits())]
                    for source in (native_model, context))
    want = build_prompt(native_model, [{"role": "user", "content": f"<image>\n{QUESTION}"}], {"image": mine})
    got = build_prompt(context, [{"role": "user", "content": f"<image>\n{QUESTION}"}], {"image": theirs})
    assert got.text == want.text and got.features.keys() == want.features.keys()
    assert all(torch.equal(got.features[k], want.features[k]) for k in want.features)
