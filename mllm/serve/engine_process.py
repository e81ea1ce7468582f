"""The generation engine in a process of its own (``mllm serve``'s default).

In one process, the event loop (HTTP, JSON, base64, media decoding, templates) and the engine's
worker thread share the GIL. Every kernel of the model releases it, and taking it back waits for
whatever Python the event loop is running (the convoy effect), so under load the model runs at a
fraction of its speed and a second core stays idle. As in vLLM's V1 engine, the server process
keeps HTTP and prompt preparation and a child process owns the model and its decode loop: the
same ``GenerationEngine`` (``create_engine``), driven through a pipe.

The child loads the checkpoint (the model never exists in the server process) and sends back a
``PromptContext`` -- processor, tokenizer, prompt record, context length -- with which the server
prepares prompts exactly as an in-process server would. Messages are pickled tuples on a duplex
``multiprocessing`` pipe:

* server -> engine: ``("announce",)``, ``("withdraw",)``, ``("submit", id, prompt, params, stream,
  announced, server_s)``, ``("cancel", id)``, ``("stats",)``, ``("close",)``;
* engine -> server: ``("ready", context, strategy)`` or ``("failed", message)`` once, then
  ``("events", [(id, events), ...])`` -- the events of all rows the worker emitted since the last
  message, so one decode step's tokens travel together -- and ``("stats", dict)`` replies.

A prompt's tensors travel as numpy arrays: plain pickling copies them once, where torch's
multiprocessing pickler would give each small tensor a shared-memory segment of its own.
If the child dies, every request in it and every later one gets an error event (500), ``/health``
says so (503), and the server stays up to answer. The child exits when the server's end of the
pipe closes, so it never outlives the server.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import logging
import multiprocessing
import pickle
import threading
import time

from mllm.errors import UserError
from mllm.serve.engine import Event, GenerationRequest, moving_average
from mllm.serve.inputs import Prompt, PromptContext

logger = logging.getLogger(__name__)


class EngineProcess:
    """``GenerationEngine``'s interface (announce, withdraw, submit, stats, close) over a child
    process that loads ``checkpoint`` and runs ``create_engine`` on it.

    ``load`` are ``load_model_for_inference``'s keyword arguments (device, template, system_prompt,
    max_new_tokens); ``threads``: torch CPU threads of the child (None: torch's default)."""

    def __init__(self, checkpoint: str, load: dict | None = None, threads: int | None = None,
                 max_batch_size: int = 8, batch_window_s: float = 0.05, start_timeout_s: float = 900.0):
        context = multiprocessing.get_context("spawn")   # no fork of a process with threads (and CUDA)
        self._conn, child_end = context.Pipe()
        self._process = context.Process(
            target=_engine_main, name="mllm-engine", daemon=True,
            args=(child_end, checkpoint, dict(load or {}), threads, max_batch_size, batch_window_s))
        self._process.start()
        child_end.close()
        message = self._first_message(checkpoint, start_timeout_s)
        if message[0] == "failed":
            self._process.join(timeout=10)
            raise UserError(f"{checkpoint}: the engine process could not load the model: {message[1]}")
        _, self.context, self.strategy = message
        self.exit_error: str | None = None       # set once the child is gone
        self._closing = False
        self._jobs: dict[int, GenerationRequest] = {}
        self._server_s: float | None = None
        self._cpu_at_submit = time.process_time()
        self._ids = itertools.count()
        self._send_lock = threading.Lock()
        self._stats_lock = threading.Lock()      # one stats question at a time
        self._stats_reply: dict | None = None
        self._stats_ready = threading.Event()
        self._reader = threading.Thread(target=self._read, name="mllm-engine-reader", daemon=True)
        self._reader.start()

    def _first_message(self, checkpoint: str, timeout_s: float):
        waited = 0.0
        while not self._conn.poll(1.0):
            waited += 1.0
            if not self._process.is_alive():
                raise UserError(f"{checkpoint}: the engine process exited while loading the model "
                                f"(exit code {self._process.exitcode}; its error is in the log above)")
            if waited >= timeout_s:
                self._process.kill()
                raise UserError(f"{checkpoint}: the engine process did not load the model in {timeout_s:g} s")
        try:
            return pickle.loads(self._conn.recv_bytes())
        except EOFError:
            self._process.join(timeout=10)
            raise UserError(f"{checkpoint}: the engine process exited while loading the model "
                            f"(exit code {self._process.exitcode})") from None

    # ------------------------------------------------------------ GenerationEngine's interface
    def announce(self) -> None:
        self._send(("announce",))

    def withdraw(self) -> None:
        self._send(("withdraw",))

    def submit(self, request: GenerationRequest, announced: bool = False) -> None:
        job_id = next(self._ids)
        self._jobs[job_id] = request
        request.on_cancel = lambda: self._cancel(job_id)
        wire = dataclasses.replace(request.prompt, features={k: v.numpy() for k, v in request.prompt.features.items()})
        # This process only serves HTTP and prepares prompts: its CPU time between two submissions
        # is what a request costs it (the engine's pipelining rule weighs it).
        cpu = time.process_time()
        self._server_s = moving_average(self._server_s, cpu - self._cpu_at_submit)
        self._cpu_at_submit = cpu
        if not self._send(("submit", job_id, wire, request.params, request.stream, announced, self._server_s)):
            self._jobs.pop(job_id, None)
            request.emit(Event("error", text=self.exit_error))

    def stats(self) -> dict:
        """The child engine's ``stats()``; ``{"error": ...}`` once it is gone."""
        with self._stats_lock:
            self._stats_ready.clear()
            if self._send(("stats",)) and self._stats_ready.wait(timeout=30) and self._stats_reply is not None:
                return self._stats_reply
        return {"error": self.exit_error or "the engine process did not answer in 30 s"}

    def close(self) -> None:
        self._closing = True
        self._send(("close",))
        self._process.join(timeout=30)
        if self._process.is_alive():
            self._process.kill()
            self._process.join(timeout=10)
        self._conn.close()

    # ------------------------------------------------------------ pipe
    def _cancel(self, job_id: int) -> None:
        if self._jobs.pop(job_id, None) is not None:
            self._send(("cancel", job_id))

    def _send(self, message) -> bool:
        """False when the child is gone (the message is dropped)."""
        if self.exit_error is not None:
            return False
        if not _write(self._conn, self._send_lock, message):
            self._lost()
            return False
        return True

    def _read(self) -> None:
        while True:
            try:
                message = pickle.loads(self._conn.recv_bytes())
            except (EOFError, OSError):
                self._lost()
                return
            if message[0] == "events":
                for job_id, events in message[1]:
                    request = self._jobs.get(job_id)
                    if request is None:
                        continue   # cancelled meanwhile
                    if any(event.kind in ("done", "error") for event in events):
                        self._jobs.pop(job_id, None)
                    request.emit(*events)
            elif message[0] == "stats":
                self._stats_reply = message[1]
                self._stats_ready.set()

    def _lost(self) -> None:
        """The child is gone: every request in it ends with an error, and so will every later one."""
        if self.exit_error is not None:
            return
        self._process.join(timeout=5)
        self.exit_error = f"the engine process exited (exit code {self._process.exitcode}); restart the server"
        if not self._closing:
            logger.error("%s", self.exit_error)
        jobs, self._jobs = self._jobs, {}
        for request in jobs.values():
            request.emit(Event("error", text=self.exit_error))
        self._stats_reply = None
        self._stats_ready.set()


def _write(conn, lock: threading.Lock, message) -> bool:
    """Pickle ``message`` onto the pipe (one writer at a time); False when the other end is gone
    (a broken pipe, or this end closed)."""
    data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    try:
        with lock:
            conn.send_bytes(data)
        return True
    except (OSError, ValueError):
        return False


# ---------------------------------------------------------------- the child


class _RemoteRequest(GenerationRequest):
    """A request in the engine process: its events go to the outbox, not to an event loop."""

    def __init__(self, prompt: Prompt, params, stream: bool, send):
        super().__init__(prompt, params, loop=None, stream=stream)
        self._send_events = send

    def emit(self, *events: Event) -> None:
        self._send_events(events)


class _Outbox:
    """Events from the engine's worker thread, sent by a thread of their own in one message per
    wake-up: what the worker emitted meanwhile (a decode step's rows) travels together."""

    def __init__(self, send):
        self._send = send
        self._items: list[tuple[int, tuple[Event, ...]]] = []
        self._changed = threading.Condition()
        self._closing = False
        self._thread = threading.Thread(target=self._run, name="mllm-engine-outbox", daemon=True)
        self._thread.start()

    def put(self, job_id: int, events: tuple[Event, ...]) -> None:
        with self._changed:
            self._items.append((job_id, events))
            self._changed.notify()

    def close(self) -> None:
        with self._changed:
            self._closing = True
            self._changed.notify()
        self._thread.join(timeout=30)

    def _run(self) -> None:
        while True:
            with self._changed:
                while not self._items and not self._closing:
                    self._changed.wait()
                items, self._items = self._items, []
                closing = self._closing
            if items and not self._send(("events", items)):
                return
            if closing and not items:
                return


def _engine_main(conn, checkpoint: str, load: dict, threads: int | None, max_batch_size: int,
                 batch_window_s: float) -> None:
    """The child: load the model, say ready, then run the engine on the server's messages until
    the server closes the pipe (or asks to close)."""
    import torch

    from mllm.serve.engine import create_engine
    from mllm.serve.inputs import load_model_for_inference

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    send = functools.partial(_write, conn, threading.Lock())   # False once the server is gone

    try:
        if threads:
            torch.set_num_threads(threads)
        model = load_model_for_inference(checkpoint, **load)
        engine = create_engine(model, max_batch_size, batch_window_s)
    except Exception as e:
        logger.exception("the engine process could not load %s", checkpoint)
        send(("failed", f"{type(e).__name__}: {e}"))
        return
    outbox = _Outbox(send)
    send(("ready", PromptContext.of(model), engine.strategy))
    requests: dict[int, GenerationRequest] = {}   # in the engine, for "cancel"

    def send_events(job_id: int, events: tuple[Event, ...]) -> None:
        if any(event.kind in ("done", "error") for event in events):
            requests.pop(job_id, None)
        outbox.put(job_id, events)

    while True:
        try:
            message = pickle.loads(conn.recv_bytes())
        except (EOFError, OSError):   # the server is gone
            break
        kind = message[0]
        if kind == "submit":
            _, job_id, prompt, params, stream, announced, server_s = message
            prompt = dataclasses.replace(prompt, features={k: torch.from_numpy(v) for k, v in prompt.features.items()})
            request = _RemoteRequest(prompt, params, stream, functools.partial(send_events, job_id))
            requests[job_id] = request
            engine.submit(request, announced, server_s)
        elif kind == "cancel":
            request = requests.pop(message[1], None)
            if request is not None:
                request.cancel()
        elif kind == "announce":
            engine.announce()
        elif kind == "withdraw":
            engine.withdraw()
        elif kind == "stats":
            send(("stats", engine.stats()))
        elif kind == "close":
            break
    engine.close()
    outbox.close()
    conn.close()


__all__ = ["EngineProcess"]
