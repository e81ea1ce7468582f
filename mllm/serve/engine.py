"""Batched, streamed generation for many concurrent requests on one model.

One worker thread owns the model. It waits for a request, then (under load: requests queued,
or the last batch held several) collects more for a short window (``batch_window_s``) up to
``max_batch_size``, and runs the compatible ones (same
sampling settings) as one left-padded ``MultimodalLM.generate`` call. A stopping criterion
sees every new token of every row: it decodes the row's text, sends the new part to the
row's asyncio queue, and ends the row at its own ``max_tokens``, at a stop string, at an
end id, or when its client went away (``cancel``). Finished rows take no further part; the
call ends when every row has. A failing batch reports the error to its requests and the
worker goes on.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import queue
import threading
import time
from dataclasses import dataclass, field

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from mllm.serve.inputs import Prompt, collate_prompts

logger = logging.getLogger(__name__)


@dataclass
class SamplingParams:
    max_tokens: int
    temperature: float = 0.0       # 0: greedy
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    min_tokens: int = 0

    def batch_key(self) -> tuple:
        """Requests batch together only when generate() takes them with the same arguments."""
        if self.temperature <= 0:
            return ("greedy", self.min_tokens)
        return ("sample", self.temperature, self.top_p, self.min_tokens)


@dataclass
class Event:
    kind: str                      # "delta" | "done" | "error"
    text: str = ""
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0


class GenerationRequest:
    def __init__(self, prompt: Prompt, params: SamplingParams, loop: asyncio.AbstractEventLoop):
        self.prompt = prompt
        self.params = params
        self.loop = loop
        self.events: asyncio.Queue[Event] = asyncio.Queue()
        self.cancelled = False
        # worker-side state
        self.tokens: list[int] = []
        self.sent = ""
        self.finish_reason: str | None = None

    def cancel(self) -> None:
        """The client went away: the row ends at its next token and frees its place."""
        self.cancelled = True

    def emit(self, event: Event) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the event loop is closed (server shutting down)
            pass


class _RowStops(StoppingCriteria):
    """Per-row bookkeeping at every generated token; returns which rows are finished."""

    def __init__(self, engine: "GenerationEngine", requests: list[GenerationRequest]):
        self.engine = engine
        self.requests = requests

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        newest = input_ids[:, -1].tolist()
        done = []
        for request, token in zip(self.requests, newest):
            if request.finish_reason is None:
                self.engine.advance(request, token)
            done.append(request.finish_reason is not None)
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


class GenerationEngine:
    def __init__(self, model, max_batch_size: int = 8, batch_window_s: float = 0.01):
        self.model = model
        self.tokenizer = model.tokenizer
        self.max_batch_size = max_batch_size
        self.batch_window_s = batch_window_s
        record = model.prompt_record
        self.end_ids = {i for i in [self.tokenizer.eos_token_id, *record.stop_token_ids] if i is not None}
        self.record_stops = list(record.stop_strings)
        self.device = next(model.parameters()).device
        self._queue: queue.Queue[GenerationRequest | None] = queue.Queue()
        self._waiting: list[GenerationRequest] = []
        self.running = 0                       # requests inside a generate call now
        self.batch_sizes: list[int] = []       # every batch run (for logs and benchmarks)
        self.finished: collections.deque = collections.deque(maxlen=256)   # (finish_reason, new tokens)
        self._thread = threading.Thread(target=self._work, name="mllm-generation", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------ public
    def submit(self, request: GenerationRequest) -> None:
        self._queue.put(request)

    @property
    def queued(self) -> int:
        return self._queue.qsize() + len(self._waiting)

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=30)

    # ------------------------------------------------------------ worker
    def _collect(self) -> list[GenerationRequest] | None:
        """Requests for the next batch: the oldest waiting one, then those arriving within the window."""
        if not self._waiting:
            first = self._queue.get()
            if first is None:
                return None
            self._waiting.append(first)
        # Wait for company only under load (requests queued, or the last batch had several):
        # a lone request on an idle server starts at once.
        busy = not self._queue.empty() or (self.batch_sizes and self.batch_sizes[-1] > 1)
        deadline = time.monotonic() + (self.batch_window_s if busy else 0.0)
        while len(self._waiting) < self.max_batch_size:
            remaining = deadline - time.monotonic()
            try:
                item = self._queue.get(timeout=max(remaining, 0)) if remaining > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            if item is None:
                self._queue.put(None)   # handle the shutdown after this batch
                break
            self._waiting.append(item)
        live = [r for r in self._waiting if not r.cancelled]
        self._waiting = []
        if not live:
            return []
        key = live[0].params.batch_key()
        batch = [r for r in live if r.params.batch_key() == key][: self.max_batch_size]
        self._waiting = [r for r in live if r not in batch]
        return batch

    def _work(self) -> None:
        while True:
            batch = self._collect()
            if batch is None:
                return
            if batch:
                self._run(batch)

    def _run(self, batch: list[GenerationRequest]) -> None:
        self.running = len(batch)
        self.batch_sizes.append(len(batch))
        try:
            inputs = collate_prompts(self.model, [r.prompt for r in batch], self.device)
            params = batch[0].params
            kwargs = {"max_new_tokens": max(r.params.max_tokens for r in batch),
                      "min_new_tokens": params.min_tokens or None,
                      "eos_token_id": sorted(self.end_ids), "pad_token_id": self.tokenizer.pad_token_id,
                      "stopping_criteria": StoppingCriteriaList([_RowStops(self, batch)])}
            if params.temperature > 0:
                kwargs.update(do_sample=True, temperature=params.temperature, top_p=params.top_p)
            else:
                kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
            with torch.inference_mode():
                self.model.generate(**inputs, **kwargs)
            for request in batch:
                if request.finish_reason is None:
                    self._finish(request, "length")
            self.finished.extend((r.finish_reason, len(r.tokens)) for r in batch)
        except Exception as e:  # one bad batch must not stop the server
            logger.exception("generation failed for a batch of %d", len(batch))
            for request in batch:
                if request.finish_reason is None:
                    request.finish_reason = "error"
                    request.emit(Event("error", text=f"generation failed: {type(e).__name__}: {e}"))
        finally:
            self.running = 0

    # ------------------------------------------------------------ per token
    def advance(self, request: GenerationRequest, token: int) -> None:
        if request.cancelled:
            request.finish_reason = "cancelled"
            return
        if token in self.end_ids:
            self._finish(request, "stop")
            return
        request.tokens.append(token)
        text = self._text(request)
        stops = request.params.stop + self.record_stops
        for stop in stops:
            at = text.find(stop)
            if at >= 0:
                self._send(request, text[:at])
                self._finish(request, "stop", flush=False)
                return
        if len(request.tokens) >= request.params.max_tokens:
            self._finish(request, "length")
            return
        # Hold back what could still become a stop string, and a half-decoded character.
        hold = max((len(s) - 1 for s in stops), default=0)
        safe = len(text) - hold
        safe = min(safe, len(text.rstrip("\ufffd")))
        self._send(request, text[:max(safe, 0)])

    def _text(self, request: GenerationRequest) -> str:
        return self.tokenizer.decode(request.tokens, skip_special_tokens=True).lstrip()

    def _send(self, request: GenerationRequest, text: str) -> None:
        if len(text) > len(request.sent) and text.startswith(request.sent):
            request.emit(Event("delta", text=text[len(request.sent):]))
            request.sent = text

    def _finish(self, request: GenerationRequest, reason: str, flush: bool = True) -> None:
        if flush:
            self._send(request, self._text(request))
        request.finish_reason = reason
        request.emit(Event("done", finish_reason=reason, prompt_tokens=request.prompt.num_tokens,
                           completion_tokens=len(request.tokens)))


__all__ = ["Event", "GenerationEngine", "GenerationRequest", "SamplingParams"]
