"""`mllm serve`'s default: the model in a process of its own (``EngineProcess``), the server in this
one, used through the real openai client; and the `mllm serve` command itself."""

from __future__ import annotations

import base64
import os
import signal
import subprocess
import sys
import time

import httpx
import openai
import pytest

from mllm.errors import UserError
from tests.serve.conftest import API_KEY, RunningServer, data_url, in_parallel, png_bytes, wav_bytes
from tests.serve.test_app import QUESTION, expected_answer, image_message


def start(checkpoint: str, **settings) -> RunningServer:
    from mllm.serve.app import ServerSettings, create_app
    from mllm.serve.engine_process import EngineProcess

    engine = EngineProcess(checkpoint, {"device": "cpu"}, threads=1, max_batch_size=4)
    return RunningServer(create_app(engine.context, ServerSettings(**settings), engine))


@pytest.fixture(scope="module")
def process_server(av_checkpoint):
    with start(av_checkpoint, model_name="tiny", api_key=API_KEY) as running:
        yield running


@pytest.fixture
def client(process_server):
    return openai.OpenAI(base_url=f"{process_server.url}/v1", api_key=API_KEY, max_retries=0, timeout=120)


def health(server) -> httpx.Response:
    return httpx.get(f"{server.url}/health", timeout=60)


def test_the_model_lives_only_in_the_engine_process(process_server):
    from mllm.serve.inputs import PromptContext

    engine = process_server.app.state.engine
    assert isinstance(engine.context, PromptContext) and engine._process.pid != os.getpid()
    body = health(process_server).json()
    assert body["status"] == "ok" and body["batching"] == "continuous" and body["running"] == 0


def test_completions_equal_generate(client, served_model, process_server):
    png, wav = png_bytes("blue", shape="square"), wav_bytes(1.5, 880)
    want = expected_answer(served_model, f"<image>\n{QUESTION}", {"image": [png]}, 10)
    assert want
    response = client.chat.completions.create(model="tiny", messages=image_message(png), max_tokens=10)
    assert response.choices[0].message.content == want and response.usage.prompt_tokens > 8
    # What the pipelining rule weighs: the server's CPU per request, and a lone request's time in the model.
    body = health(process_server).json()
    assert body["server_ms_per_request"] > 0 and body["lone_request_ms"] > 0

    want = expected_answer(served_model, "<image>\n<audio>\nHow many beeps?", {"image": [png], "audio": [wav]}, 12)
    stream = client.chat.completions.create(
        model="tiny", max_tokens=12, stream=True, messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": data_url(png)}},
            {"type": "input_audio", "input_audio": {"data": base64.b64encode(wav).decode(), "format": "wav"}},
            {"type": "text", "text": "How many beeps?"}]}])
    deltas = [c.choices[0].delta.content for c in stream if c.choices and c.choices[0].delta.content]
    assert len(deltas) > 1 and "".join(deltas) == want


def test_concurrent_requests_are_batched_in_the_engine_process(client, process_server, served_model):
    pngs = [png_bytes(color, shape=shape) for color in ("red", "blue") for shape in ("circle", "square")] * 2
    wants = [expected_answer(served_model, f"<image>\n{QUESTION}", {"image": [png]}, 8) for png in pngs]
    before = health(process_server).json()

    def ask(i):
        response = client.chat.completions.create(model="tiny", max_tokens=8, messages=image_message(pngs[i]))
        return response.choices[0].message.content

    results, errors = in_parallel(ask, len(pngs))
    assert not errors and [results[i] for i in range(len(pngs))] == wants
    after = health(process_server).json()
    prefills = after["prefills"] - before["prefills"]
    assert after["prefilled_requests"] - before["prefilled_requests"] == len(pngs) and prefills < len(pngs)


def test_bad_requests_are_answered_and_the_engine_serves_on(client):
    with pytest.raises(openai.BadRequestError, match="placeholder"):
        client.chat.completions.create(model="tiny", max_tokens=4, messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": data_url(png_bytes())}},
            {"type": "text", "text": "<image>\n<image>\nTwo images?"}]}])
    with pytest.raises(openai.BadRequestError, match="not a readable image"):
        client.chat.completions.create(model="tiny", max_tokens=4,
                                       messages=image_message(b"\x89PNG\r\n\x1a\n-broken-"))
    response = client.chat.completions.create(model="tiny", max_tokens=4, messages=image_message(png_bytes()))
    assert response.choices[0].finish_reason in ("stop", "length")


def test_client_disconnecting_mid_stream_frees_its_row_in_the_engine_process(client, process_server):
    cancelled_before = health(process_server).json()["cancelled"]
    body = {"model": "tiny", "stream": True, "max_tokens": 2000, "min_tokens": 2000,
            "messages": image_message(png_bytes())}
    headers = {"Authorization": f"Bearer {API_KEY}"}
    with httpx.stream("POST", f"{process_server.url}/v1/chat/completions", json=body, headers=headers,
                      timeout=60) as response:
        assert response.status_code == 200
        lines = response.iter_lines()
        assert any(next(lines).startswith("data: ") for _ in range(6))
    for _ in range(600):
        state = health(process_server).json()
        if state["running"] == 0 and state["queued"] == 0:
            break
        time.sleep(0.05)
    assert state["running"] == 0 and state["queued"] == 0 and state["cancelled"] == cancelled_before + 1
    response = client.chat.completions.create(model="tiny", max_tokens=4, messages=image_message(png_bytes()))
    assert response.choices[0].finish_reason in ("stop", "length")


def test_a_dead_engine_process_fails_requests_clearly_and_the_server_stays_up(av_checkpoint):
    with start(av_checkpoint, model_name="tiny") as running:
        engine = running.app.state.engine
        client = openai.OpenAI(base_url=f"{running.url}/v1", api_key="none", max_retries=0, timeout=60)
        assert client.chat.completions.create(model="tiny", max_tokens=2, messages=image_message(png_bytes()))
        engine._process.kill()
        with pytest.raises(openai.InternalServerError, match="engine process exited"):
            client.chat.completions.create(model="tiny", max_tokens=2, messages=image_message(png_bytes()))
        down = health(running)
        assert down.status_code == 503 and "engine process exited" in down.json()["error"]
        assert [m.id for m in client.models.list().data] == ["tiny"]   # the server itself still answers


def test_a_checkpoint_the_engine_process_cannot_load_is_a_clear_error(tmp_path):
    from mllm.serve.engine_process import EngineProcess

    (tmp_path / "mllm_config.json").write_text("{not json")
    with pytest.raises(UserError, match=f"{tmp_path}: the engine process could not load the model"):
        EngineProcess(str(tmp_path), {"device": "cpu"})


def test_mllm_serve_command_runs_the_engine_process_and_takes_it_down(av_checkpoint, tmp_path):
    """The real command: answers, then on SIGTERM (Ctrl-C's sibling) leaves no engine process behind."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    log = tmp_path / "serve.log"
    server = subprocess.Popen([sys.executable, "-m", "mllm.cli", "serve", av_checkpoint, "--port", str(port),
                               "--model-name", "tiny", "--device", "cpu", "--threads", "1"],
                              env=env, stdout=subprocess.DEVNULL, stderr=log.open("w"))
    try:
        for _ in range(600):
            assert server.poll() is None, log.read_text()[-3000:]
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        children = _children(server.pid)   # the engine process (and multiprocessing's resource tracker)
        assert any("spawn_main" in _command(pid) for pid in children)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=60)
        response = client.chat.completions.create(model="tiny", max_tokens=4, messages=image_message(png_bytes()))
        assert response.choices[0].finish_reason in ("stop", "length")
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=60)
    # uvicorn shuts down gracefully (the app's lifespan closes the engine), then re-raises the signal.
    assert server.returncode in (0, -signal.SIGTERM) and "Application shutdown complete" in log.read_text()
    for _ in range(100):
        if not any(os.path.exists(f"/proc/{pid}") and _state(pid) != "Z" for pid in children):
            break
        time.sleep(0.1)
    assert not any(os.path.exists(f"/proc/{pid}") and _state(pid) != "Z" for pid in children)


def _children(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(p) for p in f.read().split()]


def _command(pid: int) -> str:
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        return f.read().replace(b"\0", b" ").decode()


def _state(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return "gone"
