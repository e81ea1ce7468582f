"""A tiny image + audio checkpoint on disk, loaded once, and a real server on 127.0.0.1 for it."""

from __future__ import annotations

import asyncio
import base64
import io
import socket
import threading
import time

import numpy as np
import pytest
import soundfile
from PIL import Image, ImageDraw

from tests.conftest import TINY_PROJECTOR, model_section

API_KEY = "test-key-123"


@pytest.fixture(scope="session")
def av_checkpoint(tiny_assets, tmp_path_factory):
    """A saved (untrained) image + audio MultimodalLM over the tiny assets, LLaMA-2 prompts."""
    import torch

    from mllm.checkpoint import training_prompt_record
    from mllm.config import config_from_dict
    from mllm.demo.assets import build_tiny_beats
    from mllm.model import MultimodalLM

    folder = tmp_path_factory.mktemp("served")
    section = model_section(tiny_assets)
    section["encoders"]["audio"] = {"type": "beats", "path": build_tiny_beats(str(folder / "beats" / "beats.pt")),
                                    "num_windows": 2, "window_seconds": 1.0}
    section["projectors"]["audio"] = dict(TINY_PROJECTOR)
    torch.manual_seed(0)
    model = MultimodalLM.from_config(config_from_dict({"model": section}).model)
    model.prompt_record = training_prompt_record(model.tokenizer, "auto", "Answer briefly.")
    model.save_pretrained(str(folder / "checkpoint"))
    return str(folder / "checkpoint")


@pytest.fixture(scope="session")
def served_model(av_checkpoint):
    from mllm.serve.app import load_model_for_inference

    return load_model_for_inference(av_checkpoint, device="cpu")


class RunningServer:
    """uvicorn in a thread on a free 127.0.0.1 port (no signal handlers off the main thread)."""

    def __init__(self, app):
        import uvicorn

        self.app = app
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.sock.close()


def start_server(model, **settings) -> RunningServer:
    from mllm.serve.app import ServerSettings, create_app

    return RunningServer(create_app(model, ServerSettings(**settings)))


@pytest.fixture(scope="module")
def server(served_model, tmp_path_factory):
    """The server most tests use: API key on, small limits so each can be crossed cheaply."""
    from mllm.serve.inputs import Limits

    media_root = tmp_path_factory.mktemp("media-root")
    Image.new("RGB", (32, 32), "red").save(media_root / "red.png")
    with start_server(served_model, model_name="tiny", api_key=API_KEY, max_request_bytes=400_000,
                      media_root=str(media_root), max_batch_size=4,
                      limits=Limits(max_image_pixels=64 * 64, max_audio_seconds=2.0, max_prompt_tokens=300)) as running:
        yield running


@pytest.fixture
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0, timeout=120)


def in_parallel(call, count: int) -> tuple[dict, list[Exception]]:
    """``call(i)`` for i < count, each in its own thread at once: {i: result} and the errors raised."""
    results, errors = {}, []

    def run(i):
        try:
            results[i] = call(i)
        except Exception as e:  # noqa: BLE001 - collected for the caller's assertion
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results, errors


async def run_requests(engine, jobs, announce: bool = False):
    """Submit each (delay after the previous, prompt, params) to ``engine``; every request and the
    order they finished in. ``announce``: first announce them all, as the server does while it reads
    them (a batch then waits for the announced ones)."""
    from mllm.serve.engine import GenerationRequest

    loop = asyncio.get_running_loop()
    requests, finished = [], []

    async def wait(request):
        while (await request.events.get()).kind not in ("done", "error"):
            pass
        finished.append(request)

    if announce:
        for _ in jobs:
            engine.announce()
    waiters = []
    for delay, prompt, params in jobs:
        if delay:   # jobs with no delay are submitted back to back, with no await in between
            await asyncio.sleep(delay)
        request = GenerationRequest(prompt, params, loop, stream=True)
        engine.submit(request, announced=announce)
        requests.append(request)
        waiters.append(asyncio.create_task(wait(request)))
    await asyncio.gather(*waiters)
    return requests, finished


def png_bytes(color: str = "red", size: int = 32, shape: str = "circle") -> bytes:
    image = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(image)
    box = (size // 4, size // 4, 3 * size // 4, 3 * size // 4)
    (draw.ellipse if shape == "circle" else draw.rectangle)(box, fill=color)
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def wav_bytes(seconds: float = 1.0, freq: float = 440.0, fmt: str = "WAV") -> bytes:
    t = np.arange(int(16000 * seconds)) / 16000
    out = io.BytesIO()
    soundfile.write(out, (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32), 16000, format=fmt)
    return out.getvalue()


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"
