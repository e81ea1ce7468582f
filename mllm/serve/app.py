"""``mllm serve``: an OpenAI-compatible chat-completions server (FastAPI + uvicorn) and a chat page.

Routes: ``POST /v1/chat/completions`` (JSON or ``stream: true`` server-sent events),
``GET /v1/models``, ``GET /health``, and the browser page at ``/``. Every error is a JSON body
in OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``; errors after a stream has
started arrive in-band as a ``data: {"error": ...}`` event before ``data: [DONE]``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hmac
import json
import logging
import os
import time
import uuid
from dataclasses import dataclass
from importlib import resources

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse

from mllm.data.media import MediaError
from mllm.errors import UserError
from mllm.serve.engine import Event, GenerationRequest, create_engine
from mllm.serve.inputs import (
    InputError,
    Limits,
    PromptContext,
    accepted_fields,
    build_prompt,
    decode_media,
    decode_media_file,
    load_model_for_inference,
)
from mllm.serve.openai_api import MediaPolicy, ParsedRequest, fetch_remote, parse_chat_request

logger = logging.getLogger(__name__)

API_KEY_ENV = "MLLM_API_KEY"


@dataclass
class ServerSettings:
    model_name: str = "mllm"
    api_key: str | None = None
    max_request_bytes: int = 32 << 20
    max_batch_size: int = 8
    batch_window_ms: float = 50.0
    media_root: str | None = None
    allow_remote_media: bool = False
    limits: Limits = None  # type: ignore[assignment]

    def __post_init__(self):
        self.limits = self.limits or Limits()


class APIError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code = status, message, kind, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


class _APIKeyCheck:
    """``Authorization: Bearer KEY`` on /v1 routes, compared in constant time. Plain ASGI: no task
    group and streams per request as with ``@app.middleware("http")``."""

    def __init__(self, app, api_key: str):
        self.app, self.api_key = app, api_key.encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"].startswith("/v1") and scope["method"] != "OPTIONS":
            given = dict(scope["headers"]).get(b"authorization", b"")
            token = given[7:] if given[:7].lower() == b"bearer " else b""
            if not hmac.compare_digest(token, self.api_key):
                response = JSONResponse(APIError(401, "invalid or missing API key (Authorization: Bearer <key>)",
                                                 "authentication_error", code="invalid_api_key").body(),
                                        status_code=401)
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _from_input_error(e: Exception) -> APIError:
    if isinstance(e, InputError):
        return APIError(e.status, str(e), "invalid_request_error", e.param, e.kind)
    if isinstance(e, MediaError):
        return APIError(400, str(e), "invalid_request_error", None, "undecodable_media")
    return APIError(400, str(e), "invalid_request_error", None, "invalid_request")


def create_app(model, settings: ServerSettings | None = None, engine=None):
    """The FastAPI app serving ``model``: a loaded ``MultimodalLM`` (its engine made here, a thread
    of this process), or the ``PromptContext`` of the model an ``EngineProcess`` runs (``engine``).
    The app closes the engine when it shuts down."""
    settings = settings or ServerSettings()
    if engine is None:
        engine = create_engine(model, settings.max_batch_size, settings.batch_window_ms / 1000)
    context = PromptContext.of(model)   # all that preparing a request takes from the model, gathered once
    fields = accepted_fields(context.processor)
    policy = MediaPolicy(media_root=settings.media_root, allow_remote=settings.allow_remote_media,
                         audio_field="audio" if "audio" in fields or "speech" not in fields else "speech",
                         fields=fields)
    created = int(time.time())

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        engine.close()

    app = FastAPI(title="mllm", docs_url=None, redoc_url=None, lifespan=lifespan)
    app.state.engine = engine
    app.state.settings = settings

    @app.exception_handler(APIError)
    async def api_error(request, e: APIError):
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request, e):
        return JSONResponse(APIError(400, f"invalid request: {e.errors()}").body(), status_code=400)

    @app.exception_handler(Exception)
    async def server_error(request, e):
        logger.exception("unexpected error")
        return JSONResponse(APIError(500, f"internal error: {type(e).__name__}", "server_error").body(),
                            status_code=500)

    if settings.api_key:
        app.add_middleware(_APIKeyCheck, api_key=settings.api_key)

    @app.get("/", response_class=HTMLResponse)
    def page():
        return resources.files("mllm.serve").joinpath("page.html").read_text(encoding="utf-8")

    @app.get("/health")
    def health():
        stats = engine.stats()
        if "error" in stats:
            return JSONResponse({"status": "error", "error": stats["error"], "model": settings.model_name}, 503)
        return {"status": "ok", "model": settings.model_name, "batching": engine.strategy, "media": list(fields),
                **stats}

    @app.get("/v1/models")
    def models():
        return {"object": "list", "data": [{"id": settings.model_name, "object": "model", "created": created,
                                            "owned_by": "mllm"}]}

    async def accept(request: Request) -> tuple[ParsedRequest, GenerationRequest]:
        """Read, check and prepare one request (4xx ``APIError`` for bad input)."""
        body = await _read_json(request, settings.max_request_bytes)
        try:
            parsed = parse_chat_request(body, policy, context.prompt_record.max_new_tokens)
        except InputError as e:
            raise _from_input_error(e) from None
        if parsed.model not in (None, settings.model_name):
            raise APIError(404, f"The model `{parsed.model}` does not exist (this server has `{settings.model_name}`)",
                           "invalid_request_error", "model", "model_not_found")
        try:
            if _prepares_inline(parsed):
                # First let the requests that came in with this one announce themselves, so that the
                # engine knows how many are coming.
                await asyncio.sleep(0)
                prompt = _prepare(context, parsed, settings.limits, policy)
            else:
                prompt = await asyncio.to_thread(_prepare, context, parsed, settings.limits, policy)
        except (UserError, ValueError) as e:
            raise _from_input_error(e) from None
        return parsed, GenerationRequest(prompt, parsed.params, asyncio.get_running_loop(), stream=parsed.stream)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        engine.announce()   # from its first byte on, the engine's next prefill may wait for this request
        try:
            parsed, job = await accept(request)
        except BaseException:
            engine.withdraw()
            raise
        engine.submit(job, announced=True)
        completion_id = f"chatcmpl-{uuid.uuid4().hex}"
        now = int(time.time())
        if parsed.stream:
            return StreamingResponse(_stream(job, completion_id, now, settings.model_name, parsed.include_usage),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        text, done = "", None
        try:
            while done is None:
                event = await job.events.get()
                if event.kind == "delta":
                    text += event.text
                elif event.kind == "error":
                    raise APIError(500, event.text, "server_error")
                else:
                    done = event
        finally:
            if done is None:
                job.cancel()
        return {"id": completion_id, "object": "chat.completion", "created": now, "model": settings.model_name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                             "finish_reason": done.finish_reason, "logprobs": None}],
                "usage": _usage(done)}

    return app


async def _read_json(request, limit: int):
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise APIError(413, f"the request body is {declared} bytes; this server takes at most {limit}",
                       code="request_too_large")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise APIError(413, f"the request body is larger than {limit} bytes", code="request_too_large")
        chunks.append(chunk)
    try:
        return json.loads(b"".join(chunks))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise APIError(400, f"the request body is not valid JSON ({e})", code="invalid_json") from None


# A request with a few hundred KB of image or audio is prepared in about a millisecond, on the
# event loop. Handed to a worker thread it costs up to twice the CPU and more time under load:
# each of its many small PIL / torch calls releases the GIL and then waits to take it back (on 2
# cores, 16 concurrent clients: 1.1x the throughput inline). Videos, larger media, files and
# remote URLs go to a thread, so that no request stalls the others for long.
_INLINE_MEDIA_BYTES = 256 << 10


def _prepares_inline(parsed: ParsedRequest) -> bool:
    if any(ref.data is None or ref.field == "video" for ref in parsed.media):
        return False
    return sum(len(ref.data) for ref in parsed.media) <= _INLINE_MEDIA_BYTES


def _prepare(context: PromptContext, parsed: ParsedRequest, limits: Limits, policy: MediaPolicy):
    """Fetch and decode every media item and render the prompt."""
    media: dict[str, list] = {}
    for ref in parsed.media:
        if ref.path is not None:
            item = decode_media_file(context.processor, ref.field, ref.path, limits)
        else:
            data = ref.data if ref.url is None else fetch_remote(ref, policy)
            item = decode_media(context.processor, ref.field, data, ref.where, limits)
        media.setdefault(ref.field, []).append(item)
    return build_prompt(context, parsed.messages, media, limits)


def _usage(done: Event) -> dict:
    return {"prompt_tokens": done.prompt_tokens, "completion_tokens": done.completion_tokens,
            "total_tokens": done.prompt_tokens + done.completion_tokens}


def _sse(payload) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


async def _stream(job: GenerationRequest, completion_id: str, created: int, model_name: str, include_usage: bool):
    def chunk(delta: dict, finish_reason=None) -> str:
        return _sse({"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": model_name,
                     "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]})

    finished = False
    try:
        yield chunk({"role": "assistant", "content": ""})
        while True:
            event = await job.events.get()
            if event.kind == "delta":
                yield chunk({"content": event.text})
            elif event.kind == "error":
                yield _sse(APIError(500, event.text, "server_error").body())
                break
            else:
                yield chunk({}, event.finish_reason)
                if include_usage:
                    yield _sse({"id": completion_id, "object": "chat.completion.chunk", "created": created,
                                "model": model_name, "choices": [], "usage": _usage(event)})
                break
        finished = True
        yield "data: [DONE]\n\n"
    finally:
        if not finished:   # the client went away mid-stream: free the row
            job.cancel()


# --------------------------------------------------------------------------- command line


def serve_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mllm serve", description="Serve a checkpoint over the OpenAI chat-completions API "
        "(POST /v1/chat/completions, GET /v1/models, GET /health) with a chat page at /.")
    parser.add_argument("checkpoint", help="stage-1/2 output folder, an `mllm export` folder, or a Hub id")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine "
                        "only; 0.0.0.0 exposes the server to the network)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--model-name", help="the name clients send as `model` (default: the folder's name)")
    parser.add_argument("--api-key", help=f"require `Authorization: Bearer KEY` on /v1 routes (or set {API_KEY_ENV})")
    parser.add_argument("--media-root", help="allow local media paths (and file:// URLs) under this folder")
    parser.add_argument("--allow-remote-media", action="store_true", help="fetch http(s) media URLs (off by default)")
    parser.add_argument("--max-batch-size", type=int, default=8)
    parser.add_argument("--batch-window-ms", type=float, default=50.0,
                        help="under load, how long after the last arrival a prefill waits for requests still being "
                        "read or prepared, or for as many as the recent load (a lone request never waits)")
    parser.add_argument("--max-request-bytes", type=int, default=32 << 20)
    parser.add_argument("--max-image-pixels", type=int, default=Limits.max_image_pixels)
    parser.add_argument("--max-audio-seconds", type=float, default=Limits.max_audio_seconds)
    parser.add_argument("--max-prompt-tokens", type=int, help="default: the LLM's context length")
    parser.add_argument("--template", help="override the checkpoint's recorded chat template (plain, llama-2, jinja)")
    parser.add_argument("--system-prompt", help="override the checkpoint's recorded system prompt")
    parser.add_argument("--max-new-tokens", type=int, help="default max_tokens (default: the checkpoint's record)")
    parser.add_argument("--device", help="default: cuda if available, else cpu")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice; 1 is often fastest "
                        "for small models on a busy CPU)")
    parser.add_argument("--engine", choices=("process", "thread"), default="process",
                        help="where the model runs: `process` (default), a process of its own, so HTTP and media "
                        "decoding never hold up its kernels (Python's GIL); `thread`, in this process (one model "
                        "load, one process to debug)")
    return parser


def serve_main(argv: list[str] | None = None) -> int:
    args = serve_parser().parse_args(argv)
    import torch
    import uvicorn
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    load = {"device": args.device, "template": args.template, "system_prompt": args.system_prompt,
            "max_new_tokens": args.max_new_tokens}
    settings = ServerSettings(
        model_name=args.model_name or os.path.basename(os.path.normpath(args.checkpoint)),
        api_key=args.api_key or os.environ.get(API_KEY_ENV) or None, max_request_bytes=args.max_request_bytes,
        max_batch_size=args.max_batch_size, batch_window_ms=args.batch_window_ms, media_root=args.media_root,
        allow_remote_media=args.allow_remote_media,
        limits=Limits(args.max_image_pixels, args.max_audio_seconds, args.max_prompt_tokens))
    if args.engine == "process":
        from mllm.serve.engine_process import EngineProcess

        # This process only prepares inputs, many requests at once: an intra-op thread pool would
        # add nothing but OpenMP threads spinning after each small op, on the engine's cores.
        torch.set_num_threads(1)

        engine = EngineProcess(args.checkpoint, load, args.threads, settings.max_batch_size,
                               settings.batch_window_ms / 1000)
        app = create_app(engine.context, settings, engine)
    else:
        if args.threads:
            torch.set_num_threads(args.threads)
        app = create_app(load_model_for_inference(args.checkpoint, **load), settings)
    print(f"mllm serve: model '{settings.model_name}' at http://{args.host}:{args.port}/ "
          f"(OpenAI base URL http://{args.host}:{args.port}/v1; API key {'required' if settings.api_key else 'off'})",
          flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")
    return 0


__all__ = ["APIError", "ServerSettings", "create_app", "serve_main"]
