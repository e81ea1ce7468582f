"""`mllm serve` on 127.0.0.1, used through the real openai client (and raw HTTP where a client would hide it)."""

from __future__ import annotations

import base64
import json
import threading
import time

import httpx
import openai
import pytest

from mllm.serve.inputs import Limits, build_prompt, decode_media, generate_text
from tests.serve.conftest import API_KEY, data_url, in_parallel, png_bytes, wav_bytes

QUESTION = "What color is the shape?"


def expected_answer(model, content: str, media: dict[str, list[bytes]], max_tokens: int) -> str:
    """What MultimodalLM.generate gives for the same conversation, decoded as the server sends it."""
    items = {field: [decode_media(model.processor, field, data, field, Limits()) for data in datas]
             for field, datas in media.items()}
    prompt = build_prompt(model, [{"role": "user", "content": content}], items)
    return generate_text(model, prompt, max_new_tokens=max_tokens)


def image_message(png: bytes, text: str = QUESTION) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(png), "detail": "low"}},
                                         {"type": "text", "text": text}]}]


def test_models_and_health(client, server):
    assert [m.id for m in client.models.list().data] == ["tiny"]
    health = httpx.get(f"{server.url}/health").json()
    assert health["status"] == "ok" and set(health["media"]) >= {"image", "audio"}


def test_completion_equals_generate(client, served_model):
    png = png_bytes("blue", shape="square")
    want = expected_answer(served_model, f"<image>\n{QUESTION}", {"image": [png]}, 10)
    assert want  # a non-empty answer, so equality means something
    response = client.chat.completions.create(model="tiny", messages=image_message(png), max_tokens=10,
                                              temperature=0)
    assert response.choices[0].message.content == want
    assert response.choices[0].finish_reason in ("stop", "length")
    assert response.usage.completion_tokens <= 10 and response.usage.prompt_tokens > 8


def test_streamed_completion_equals_generate(client, served_model):
    wav = wav_bytes(1.5, 880)
    want = expected_answer(served_model, "<image>\n<audio>\nHow many beeps?",
                           {"image": [png_bytes()], "audio": [wav]}, 12)
    stream = client.chat.completions.create(
        model="tiny", max_tokens=12, stream=True, stream_options={"include_usage": True},
        messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": data_url(png_bytes())}},
            {"type": "input_audio", "input_audio": {"data": base64.b64encode(wav).decode(), "format": "wav"}},
            {"type": "text", "text": "How many beeps?"}]}])
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    deltas = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(deltas) > 1 and "".join(deltas) == want
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0


def test_video_part_equals_generate(client, served_model, tmp_path):
    from PIL import Image

    from mllm.data.media import write_video

    frames = [Image.new("RGB", (32, 32), color) for color in ("red", "green", "blue", "white")]
    write_video(tmp_path / "clip.mp4", frames, fps=4)
    video = (tmp_path / "clip.mp4").read_bytes()
    want = expected_answer(served_model, "<video>\nWhat happens?", {"video": [video]}, 10)
    response = client.chat.completions.create(model="tiny", max_tokens=10, messages=[{"role": "user", "content": [
        {"type": "video_url", "video_url": {"url": data_url(video, "video/mp4")}},
        {"type": "text", "text": "What happens?"}]}])
    assert want and response.choices[0].message.content == want


def test_stop_strings_are_cut_and_the_placeholder_may_stand_in_the_text(client, served_model):
    png = png_bytes("green")
    full = expected_answer(served_model, f"Look: <image> {QUESTION}", {"image": [png]}, 12)
    stop = full[3:5]
    response = client.chat.completions.create(
        model="tiny", max_tokens=12, stop=[stop],
        messages=[{"role": "user", "content": [{"type": "text", "text": f"Look: <image> {QUESTION}"},
                                               {"type": "image_url", "image_url": {"url": data_url(png)}}]}])
    assert response.choices[0].message.content == full[:full.find(stop)]
    assert response.choices[0].finish_reason == "stop"


def test_concurrent_requests_are_batched(client, server):
    engine = server.app.state.engine
    before = len(engine.batch_sizes)

    def ask(i):
        response = client.chat.completions.create(
            model="tiny", max_tokens=8, messages=image_message(png_bytes(shape="circle" if i % 2 else "square")))
        return response.choices[0].message.content

    results, errors = in_parallel(ask, 8)
    assert not errors and len(results) == 8
    assert max(engine.batch_sizes[before:]) > 1 and max(engine.batch_sizes) <= 4


def _big_png(size: int) -> bytes:
    import io

    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", (size, size), "red").save(out, format="PNG")
    return out.getvalue()


BAD_REQUESTS = [
    ("unknown content part", [{"role": "user", "content": [{"type": "image_file", "file": "x"}]}], {},
     400, "unknown content part type 'image_file'"),
    ("undecodable image", image_message(b"\x89PNG not really"), {}, 400, "not a readable image"),
    ("not base64", [{"role": "user",
                     "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,@@@"}}]}],
     {}, 400, "not valid base64"),
    ("undecodable audio", [{"role": "user", "content": [{"type": "input_audio", "input_audio": {
        "data": base64.b64encode(b"RIFF....WAVEjunk").decode(), "format": "wav"}}]}], {}, 400, "not a decodable audio"),
    ("too many pixels", image_message(_big_png(65)), {}, 400, "65x65 = 4225 pixels; this server takes at most 4096"),
    ("audio too long", [{"role": "user", "content": [{"type": "input_audio", "input_audio": {
        "data": base64.b64encode(wav_bytes(3.0)).decode(), "format": "wav"}}]}], {}, 400, "audio is 3.0 s long"),
    ("prompt too long", [{"role": "user", "content": "shape " * 400}], {}, 400, "this server takes at most 300"),
    ("placeholder mismatch", image_message(png_bytes(), "<image> and <image>: which is red?"), {}, 400,
     "2 <image> placeholder(s) but 1 image part(s)"),
    ("placeholder without media", [{"role": "user", "content": "<audio> what is this?"}], {}, 400,
     "1 <audio> placeholder(s) but 0 audio"),
    ("no speech encoder", [{"role": "user", "content": [{"type": "input_audio", "input_audio": {
        "data": base64.b64encode(wav_bytes(1.0)).decode(), "format": "wav", "modality": "speech"}}]}], {}, 400,
     "this model has no encoder for speech input"),
    ("undecodable video", [{"role": "user", "content": [{"type": "video_url", "video_url": {
        "url": data_url(b"not a video at all", "video/mp4")}}]}], {}, 400, "cannot read messages[0].content[0]"),
    ("remote url refused", [{"role": "user", "content": [{"type": "image_url", "image_url": {
        "url": "https://example.com/cat.png"}}]}], {}, 400, "https URLs are refused"),
    ("path outside media root", [{"role": "user", "content": [{"type": "image_url", "image_url": {
        "url": "file:///etc/passwd"}}]}], {}, 403, "lies outside the media root"),
    ("n > 1", image_message(png_bytes()), {"n": 2}, 400, "one choice per request"),
    ("bad temperature", image_message(png_bytes()), {"temperature": 3}, 400, "temperature must be a number in [0, 2]"),
    ("roles out of order", [{"role": "assistant", "content": "hi"}], {}, 400, "role 'assistant' but 'user'"),
    ("tool role", [{"role": "tool", "content": "x"}], {}, 400, "role 'tool' is not supported"),
    ("unknown model", image_message(png_bytes()), {"model": "gpt-4o"}, 404, "The model `gpt-4o` does not exist"),
    ("request too large", [{"role": "user", "content": "x" * 500_000}], {}, 413, "this server takes at most 400000"),
]


@pytest.mark.parametrize("messages,extra,status,message", [b[1:] for b in BAD_REQUESTS],
                         ids=[b[0] for b in BAD_REQUESTS])
def test_bad_request_gets_a_clear_openai_error(client, messages, extra, status, message):
    kwargs = {"model": "tiny", "messages": messages, "max_tokens": 4, **extra}
    with pytest.raises(openai.APIStatusError) as caught:
        client.chat.completions.create(**kwargs)
    assert caught.value.status_code == status
    assert message in caught.value.message
    assert set(caught.value.body) >= {"message", "type", "param", "code"}   # OpenAI's error shape


def test_local_file_under_media_root_and_bad_requests_leave_the_server_serving(client, served_model):
    response = client.chat.completions.create(model="tiny", max_tokens=6, messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "red.png"}}, {"type": "text", "text": QUESTION}]}])
    assert response.choices[0].finish_reason in ("stop", "length")
    # Good and bad requests at once: every good one is answered.
    outcomes = []

    def good():
        outcomes.append(client.chat.completions.create(model="tiny", max_tokens=6,
                                                       messages=image_message(png_bytes())).choices[0].finish_reason)

    def bad():
        try:
            client.chat.completions.create(model="tiny", messages=image_message(b"garbage"), max_tokens=6)
        except openai.BadRequestError:
            outcomes.append("refused")

    threads = [threading.Thread(target=f) for f in (good, bad, good, bad, good)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(outcomes) == sorted(["refused", "refused"] + [o for o in outcomes if o != "refused"])
    assert outcomes.count("refused") == 2 and len(outcomes) == 5


def test_invalid_json_and_missing_api_key(server):
    headers = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}
    bad_json = httpx.post(f"{server.url}/v1/chat/completions", content=b"{not json", headers=headers)
    assert bad_json.status_code == 400 and "not valid JSON" in bad_json.json()["error"]["message"]
    from openai import OpenAI

    wrong = OpenAI(base_url=f"{server.url}/v1", api_key="wrong-key", max_retries=0)
    with pytest.raises(openai.AuthenticationError, match="invalid or missing API key"):
        wrong.models.list()
    assert httpx.get(f"{server.url}/v1/models").status_code == 401
    assert httpx.get(f"{server.url}/health").status_code == 200   # health needs no key


def test_client_disconnecting_mid_stream_frees_its_slot(client, server):
    engine = server.app.state.engine
    body = {"model": "tiny", "stream": True, "max_tokens": 400, "min_tokens": 400,
            "messages": image_message(png_bytes())}
    headers = {"Authorization": f"Bearer {API_KEY}"}
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body, headers=headers, timeout=60) as response:
        assert response.status_code == 200
        lines = response.iter_lines()
        received = [next(lines) for _ in range(6)]
    assert any(line.startswith("data: ") for line in received)
    for _ in range(600):   # the row ends at its next token once the server sees the disconnect
        if engine.running == 0 and engine.queued == 0:
            break
        time.sleep(0.05)
    assert engine.running == 0 and engine.queued == 0
    reason, tokens = next(entry for entry in reversed(engine.finished) if entry[0] == "cancelled")
    assert tokens < 400
    # The slot is free: the next request is served at once.
    response = client.chat.completions.create(model="tiny", max_tokens=4, messages=image_message(png_bytes()))
    assert response.choices[0].finish_reason in ("stop", "length")


def test_streaming_error_after_start_is_in_band(served_model, monkeypatch):
    """A batch that fails mid-generation: the stream carries an error event, the server goes on."""
    from tests.serve.conftest import start_server

    with start_server(served_model, model_name="tiny") as running:
        engine = running.app.state.engine
        real = engine.model.llm.forward
        calls = {"n": 0}

        def failing_once(*args, **kwargs):   # the prompt forward works, the first decode step fails
            calls["n"] += 1
            if calls["n"] == 2:
                raise RuntimeError("device lost")
            return real(*args, **kwargs)

        monkeypatch.setattr(engine.model.llm, "forward", failing_once)
        client = openai.OpenAI(base_url=f"{running.url}/v1", api_key="none", max_retries=0)
        with pytest.raises(openai.APIError, match="device lost"):
            list(client.chat.completions.create(model="tiny", max_tokens=4, stream=True, extra_body={"min_tokens": 4},
                                                messages=image_message(png_bytes())))
        ok = client.chat.completions.create(model="tiny", max_tokens=4, messages=image_message(png_bytes()))
        assert ok.choices[0].finish_reason in ("stop", "length")
    assert json.dumps(ok.model_dump())  # plain JSON all the way


class _SlowMediaHost:
    """A real HTTP server on 127.0.0.1 that holds its answer for /slow.png until ``release``."""

    def __init__(self, png: bytes):
        import http.server

        host = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                if self.path != "/slow.png":
                    self.send_error(404)
                    return
                host.asked.set()
                host.release.wait(timeout=60)
                self.send_response(200)
                self.send_header("Content-Type", "image/png")
                self.send_header("Content-Length", str(len(png)))
                self.end_headers()
                self.wfile.write(png)

            def log_message(self, *args):
                pass

        self.asked, self.release = threading.Event(), threading.Event()
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.release.set()
        self.httpd.shutdown()


def test_remote_media_is_fetched_without_stalling_other_requests(served_model):
    """With --allow-remote-media, an http(s) image is fetched while the request is prepared, off the
    event loop: a text request is answered while the fetch still waits; then the image's answer
    equals generate on the same bytes, and an unreachable URL is a 400."""
    from openai import OpenAI

    from tests.serve.conftest import start_server

    png = png_bytes("blue", shape="square")
    media = _SlowMediaHost(png)
    answers = {}
    try:
        with start_server(served_model, model_name="tiny", allow_remote_media=True) as running:
            client = OpenAI(base_url=f"{running.url}/v1", api_key="none", max_retries=0, timeout=30)

            def ask_remote():
                answers["remote"] = client.chat.completions.create(model="tiny", max_tokens=8, messages=[
                    {"role": "user", "content": [{"type": "image_url", "image_url": {"url": f"{media.url}/slow.png"}},
                                                 {"type": "text", "text": QUESTION}]}]).choices[0].message.content

            remote = threading.Thread(target=ask_remote)
            remote.start()
            assert media.asked.wait(timeout=30)
            text = client.chat.completions.create(model="tiny", max_tokens=4,
                                                  messages=[{"role": "user", "content": "Say something."}])
            answered_while_fetching = text.choices[0].finish_reason in ("stop", "length") and "remote" not in answers
            media.release.set()
            remote.join(timeout=60)
            with pytest.raises(openai.BadRequestError, match="cannot fetch"):
                client.chat.completions.create(model="tiny", max_tokens=4, messages=[{"role": "user", "content": [
                    {"type": "image_url", "image_url": {"url": f"{media.url}/missing.png"}},
                    {"type": "text", "text": QUESTION}]}])
    finally:
        media.close()
    assert answered_while_fetching
    assert answers["remote"] == expected_answer(served_model, f"<image>\n{QUESTION}", {"image": [png]}, 8)


def test_small_inline_media_are_prepared_on_the_event_loop_and_the_rest_in_a_thread():
    from mllm.serve.app import _prepares_inline
    from mllm.serve.engine import SamplingParams
    from mllm.serve.openai_api import MediaRef, ParsedRequest

    def parsed(*refs):
        return ParsedRequest([{"role": "user", "content": "hi"}], list(refs), SamplingParams(max_tokens=4))

    small = MediaRef("image", "part 0", data=png_bytes())
    assert _prepares_inline(parsed()) and _prepares_inline(parsed(small, MediaRef("audio", "part 1", data=wav_bytes())))
    assert not _prepares_inline(parsed(small, MediaRef("image", "part 1", data=b"x" * (300 << 10))))   # large
    assert not _prepares_inline(parsed(MediaRef("video", "part 0", data=b"x" * 100)))
    assert not _prepares_inline(parsed(MediaRef("image", "part 0", path="/media/red.png")))
    assert not _prepares_inline(parsed(MediaRef("image", "part 0", url="https://example.com/a.png")))
