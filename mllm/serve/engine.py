"""Batched, streamed generation for many concurrent requests on one model.

One worker thread owns the model; requests reach it through a queue. ``mllm serve`` runs the
engine in a process of its own (``mllm.serve.engine_process``), ``mllm chat`` in a thread. Two
ways of batching, chosen per model by ``create_engine`` (``MultimodalLM.supports_continuous_batching``):

* ``ContinuousBatchingEngine`` runs its own decode loop over a *running batch* of rows (one row per
  request, KV cache left-padded to a common length). Between two decode steps, waiting requests are
  prefilled together in one left-padded forward (media of all of them encoded together) and their
  cache rows appended; finished rows leave at once, so a short answer never waits for the batch's
  longest and its slot goes to the next request. Each row keeps its own sampling settings
  (greedy, or temperature / top-p), ``min_tokens`` and ``max_tokens``. Greedy rows give, token for
  token, what ``MultimodalLM.generate`` gives for the prompt alone: the same prompt forward
  (``MultimodalLM._prepare_inputs``), positions that skip left padding, padding masked out.
* ``GenerateBatchEngine`` runs each batch as one left-padded ``MultimodalLM.generate`` call: for
  models whose rows cannot change between decode steps -- an adapter that keeps per-sample state
  from the prompt pass (DeLo's routing), or a native vision-language LM whose rotary positions
  ``generate`` computes (Qwen-VL's 3-D positions). Rows of one call share sampling settings; a
  finished row takes no further part, but the call ends when every row has.

Prefill costs about the same for one prompt or sixteen, so under load arrivals are gathered:
a batch waits, at most ``batch_window_s`` after the last arrival, while requests the server is
still reading or preparing are announced (``announce``) or fewer are in than the recent load
(the most requests in the server at once over the last second); running rows go on decoding
meanwhile. But when preparing the load takes the server much longer than the model takes for a
lone request (``_Pace.pipelining_pays``: many clients, short answers), an idle model waits for
no more than half of the recent load, and only while requests are being prepared: it runs the
first half while the server prepares the second, and the halves go on taking turns, a two-stage
pipeline (waiting for all of them would idle the model through every preparation and the server
through every prefill; with few clients one batch of all of them is faster). Media are encoded
in the prefill, one encoder pass for the whole batch (encoding early arrivals one by one while a
batch gathered cost more CPU than it saved). A lone request on an idle server starts at once.
After every token the row's text is decoded, checked for stop strings, and its new part sent to
the request's asyncio queue (streamed requests) or kept for the final answer. A client that went
away (``cancel``) ends its row at the next token. A failing prefill, step or batch reports the
error to the requests it held and the worker goes on.
"""

from __future__ import annotations

import asyncio
import collections
import inspect
import logging
import queue
import threading
import time
from dataclasses import dataclass, field

import torch
from transformers import StoppingCriteria, StoppingCriteriaList
from transformers.cache_utils import DynamicCache

from mllm.modality import MEDIA_INPUT_KEYS
from mllm.model.splice import position_ids_from_attention_mask
from mllm.serve.inputs import Prompt, collate_prompts

logger = logging.getLogger(__name__)

_RECENT_MAX = 4096


@dataclass
class SamplingParams:
    max_tokens: int
    temperature: float = 0.0       # 0: greedy
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    min_tokens: int = 0

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0

    def batch_key(self) -> tuple:
        """Requests share a ``generate`` call (GenerateBatchEngine) only with the same arguments."""
        return ("greedy", self.min_tokens) if self.greedy else ("sample", self.temperature, self.top_p, self.min_tokens)


@dataclass
class Event:
    kind: str                      # "delta" | "done" | "error"
    text: str = ""
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0


class GenerationRequest:
    """One prompt to complete. ``stream=False``: the text arrives as one delta just before "done"
    (fewer wake-ups of the event loop than one per token)."""

    def __init__(self, prompt: Prompt, params: SamplingParams, loop: asyncio.AbstractEventLoop,
                 stream: bool = True):
        self.prompt = prompt
        self.params = params
        self.loop = loop
        self.stream = stream
        self.events: asyncio.Queue[Event] = asyncio.Queue()
        self.cancelled = False
        self.on_cancel = None   # called by cancel() (EngineProcess tells its engine)
        # worker-side state
        self.tokens: list[int] = []
        self.sent = ""
        self.finish_reason: str | None = None

    def cancel(self) -> None:
        """The client went away: the row ends at its next token and frees its place."""
        self.cancelled = True
        if self.on_cancel is not None:
            self.on_cancel()

    def emit(self, *events: Event) -> None:
        try:
            self.loop.call_soon_threadsafe(self._put, events)
        except RuntimeError:  # the event loop is closed (server shutting down)
            pass

    def _put(self, events) -> None:
        for event in events:
            self.events.put_nowait(event)


class _RunningBatch:
    """The rows being decoded: their requests, KV cache, attention mask, next positions and last tokens."""

    def __init__(self, requests, cache, attention_mask, positions, last_tokens):
        self.requests: list[GenerationRequest] = requests
        self.cache: DynamicCache = cache
        self.attention_mask: torch.Tensor = attention_mask   # (B, L) 1 = real token
        self.positions: torch.Tensor = positions             # (B,) position of the next token
        self.last_tokens: torch.Tensor = last_tokens         # (B,) token to feed next

    def __len__(self) -> int:
        return len(self.requests)

    def extend(self, other: "_RunningBatch") -> None:
        """Append ``other``'s rows; the shorter side's cache and mask are left-padded to the longer."""
        length = max(self.attention_mask.shape[1], other.attention_mask.shape[1])
        for mine, theirs in zip(self.cache.layers, other.cache.layers):
            mine.keys = torch.cat([_left_pad(mine.keys, length, -2), _left_pad(theirs.keys, length, -2)])
            mine.values = torch.cat([_left_pad(mine.values, length, -2), _left_pad(theirs.values, length, -2)])
        self.attention_mask = torch.cat([_left_pad(self.attention_mask, length, -1),
                                         _left_pad(other.attention_mask, length, -1)])
        self.positions = torch.cat([self.positions, other.positions])
        self.last_tokens = torch.cat([self.last_tokens, other.last_tokens])
        self.requests = self.requests + other.requests

    def keep(self, rows: list[int]) -> None:
        """Keep only ``rows``, and drop leading columns that are padding in every kept row."""
        index = torch.tensor(rows, device=self.attention_mask.device)
        mask = self.attention_mask.index_select(0, index)
        first = int(mask.any(0).long().argmax())
        for layer in self.cache.layers:
            layer.keys = layer.keys.index_select(0, index)[:, :, first:]
            layer.values = layer.values.index_select(0, index)[:, :, first:]
        self.attention_mask = mask[:, first:]
        self.positions = self.positions.index_select(0, index)
        self.last_tokens = self.last_tokens.index_select(0, index)
        self.requests = [self.requests[i] for i in rows]


class _Pace:
    """What the pipelining rule (module docstring) weighs, as moving averages (None until measured):
    ``server_s``, the server's CPU time per request (reported by ``EngineProcess``, whose server
    process does nothing else), and ``lone_s``, the model's time for a request alone -- a busy
    spell, from leaving idle to idle again, with one request in it."""

    def __init__(self):
        self.server_s: float | None = None
        self.lone_s: float | None = None
        self._busy_since: float | None = None
        self._busy_requests = 0

    def started(self, count: int) -> None:
        """``count`` requests go into the model."""
        if self._busy_since is None:
            self._busy_since = time.monotonic()
        self._busy_requests += count

    def idle(self) -> None:
        """The model has no rows."""
        if self._busy_since is not None:
            if self._busy_requests == 1:
                self.lone_s = moving_average(self.lone_s, time.monotonic() - self._busy_since)
            self._busy_since, self._busy_requests = None, 0

    def pipelining_pays(self, load: int) -> bool:
        """With a batch costing the model a + b * rows, one batch of everything takes a wave
        S + a + b * load (S: the server preparing the load, the model idle meanwhile); halves taking
        turns take about max(S, 2a + b * load), shorter once S > a. ``a`` is at most a lone request's
        time; asking S >= 2 * lone_s leaves room for what the model's fixed cost hides and for the
        two stages sharing CPU cores (on 2 cores, halves lost 10% at 4 clients and gained 30-45%
        at 16)."""
        return self.server_s is not None and self.lone_s is not None and load * self.server_s >= 2 * self.lone_s


def moving_average(average: float | None, value: float) -> float:
    return value if average is None else 0.75 * average + 0.25 * value


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(1000 * seconds, 3)


def _append_recent(sizes: list[int], value: int) -> None:
    """Append, dropping the oldest half past ``_RECENT_MAX`` (a server runs for weeks)."""
    sizes.append(value)
    if len(sizes) > _RECENT_MAX:
        del sizes[:_RECENT_MAX // 2]


def _left_pad(tensor: torch.Tensor, length: int, dim: int) -> torch.Tensor:
    missing = length - tensor.shape[dim]
    if missing == 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = missing
    return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)


class GenerationEngine:
    """What both ways of batching share: the request queue and how batches gather (module
    docstring), the worker thread, and each row's per-token bookkeeping. Subclasses say how the
    gathered requests are run (``_run_arrivals``) and which rows are in the model (``_rows``)."""

    #: Shown by ``/health`` and the log line at start.
    strategy = ""

    def __init__(self, model, max_batch_size: int = 8, batch_window_s: float = 0.05):
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
        self._last_arrival = 0.0
        self._recent_load, self._recent_load_at = 0, 0.0
        self._lock = threading.Lock()
        self.announced = 0                     # requests accepted and being prepared (not queued yet)
        self.pace = _Pace()
        # Rows of the recent model forwards or generate calls, and prompts of the recent prefills (for
        # tests and logs; the oldest half is dropped past _RECENT_MAX); totals since start in _totals.
        self.batch_sizes: list[int] = []
        self.prefill_sizes: list[int] = []
        self._totals = {"batches": 0, "batched_requests": 0, "prefills": 0, "prefilled_requests": 0}
        self.finished: collections.deque = collections.deque(maxlen=256)   # (finish_reason, new tokens)
        self.cancelled_rows = 0                # rows ended because their client went away
        self._thread = threading.Thread(target=self._work, name="mllm-generation", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------ public
    def announce(self) -> None:
        """A request was accepted and is being prepared (media decoded): a batch may wait for it."""
        with self._lock:
            self.announced += 1

    def withdraw(self) -> None:
        """An announced request will not come (bad input, client gone)."""
        with self._lock:
            self.announced -= 1

    def submit(self, request: GenerationRequest, announced: bool = False, server_s: float | None = None) -> None:
        """Queue ``request``; ``announced``: it was announced; ``server_s``: the server's CPU time per
        request lately (``_Pace``)."""
        if server_s is not None:
            self.pace.server_s = server_s
        with self._lock:   # queued and no longer announced at once, as the worker sees it
            self._queue.put(request)
            if announced:
                self.announced -= 1

    @property
    def queued(self) -> int:
        return self._queue.qsize() + len(self._waiting)

    @property
    def running(self) -> int:
        """Rows in the model now."""
        return len(self._rows())

    def stats(self) -> dict:
        """Counts for ``/health`` and benchmarks: rows now, requests waiting, forwards and prefills so
        far, and what the pipelining rule weighs (``_Pace``, in ms; None until measured)."""
        return {"running": self.running, "queued": self.queued, **self._totals, "cancelled": self.cancelled_rows,
                "server_ms_per_request": _ms(self.pace.server_s), "lone_request_ms": _ms(self.pace.lone_s)}

    def _count(self, rows: int, prefill: bool) -> None:
        """Book one model forward (or generate call) over ``rows`` rows; ``prefill``: of new prompts."""
        self._totals["batches"] += 1
        self._totals["batched_requests"] += rows
        _append_recent(self.batch_sizes, rows)
        if prefill:
            self._totals["prefills"] += 1
            self._totals["prefilled_requests"] += rows
            _append_recent(self.prefill_sizes, rows)

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=30)

    # ------------------------------------------------------------ what subclasses define
    def _rows(self) -> list[GenerationRequest]:
        """The requests whose rows are in the model (between two looks at the queue: a running batch)."""
        raise NotImplementedError

    def _drop_rows(self) -> None:
        """Forget the rows in the model (after a failure that lost them)."""
        raise NotImplementedError

    def _run_arrivals(self, arrivals: list[GenerationRequest]) -> None:
        """Run the requests just gathered ([] : none arrived; decode what is running)."""
        raise NotImplementedError

    # ------------------------------------------------------------ worker
    def _work(self) -> None:
        with torch.inference_mode():
            while True:
                try:
                    arrivals = self._collect()
                    if arrivals is None:
                        return
                    self._run_arrivals(arrivals)
                except Exception as e:  # a bug in the bookkeeping: fail the rows in hand, keep serving
                    lost = self._rows()
                    self._drop_rows()
                    self._fail(lost, e)

    def _collect(self) -> list[GenerationRequest] | None:
        """Requests to run now ([]: none yet; None: shut down); the gathering rule is in the module
        docstring."""
        while True:
            running = len(self._rows())
            if not running:
                self.pace.idle()
            if not running and not self._waiting:
                first = self._queue.get()
                if first is None:
                    return None
                self._arrived(first)
            shutting_down = self._drain()
            room = self.max_batch_size - running
            self._waiting = [r for r in self._waiting if not r.cancelled]
            if room <= 0:
                return []
            if not self._waiting:
                if shutting_down and not running:
                    return None
                if not running:
                    continue
                return []
            remaining = self._last_arrival + self.batch_window_s - time.monotonic()
            more_coming = self.announced > 0 or len(self._waiting) + running < self._recent_load
            if remaining <= 0 and more_coming and not self.announced:
                # The window passed with fewer requests than the recent load: the load dropped;
                # the next lone request must not wait for it again.
                self._recent_load, self._recent_load_at = len(self._waiting) + running, time.monotonic()
            # A pipeline's next half: up to half the load, and no one still to wait for being prepared.
            half_in = (not running and (2 * len(self._waiting) >= self._recent_load or not self.announced)
                       and self.pace.pipelining_pays(self._recent_load))
            if shutting_down or len(self._waiting) >= room or not more_coming or remaining <= 0 or half_in:
                arrivals, self._waiting = self._waiting[:room], self._waiting[room:]
                self.pace.started(len(arrivals))
                return arrivals
            if running:
                return []          # decode a step, look again after it
            try:
                item = self._queue.get(timeout=remaining)
            except queue.Empty:
                continue
            if item is None:
                self._queue.put(None)
            else:
                self._arrived(item)

    def _arrived(self, request: GenerationRequest) -> None:
        self._waiting.append(request)
        now = time.monotonic()
        # Requests in the server at once, the most of the last second: under steady load from N
        # clients, the next batch waits (within the window) until about N are in.
        with self._lock:
            announced = self.announced
        load = len(self._waiting) + announced + len(self._rows())
        if load >= self._recent_load or now - self._recent_load_at > 1.0:
            self._recent_load, self._recent_load_at = load, now
        self._last_arrival = now

    def _drain(self) -> bool:
        """Move every queued request to ``_waiting``; True when a shutdown was asked for."""
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return False
            if item is None:
                self._queue.put(None)   # seen again on the next look, once the work in hand is done
                return True
            self._arrived(item)

    def _fail(self, requests: list[GenerationRequest], error: Exception) -> None:
        logger.exception("generation failed for %d request(s)", len(requests), exc_info=error)
        for request in requests:
            if request.finish_reason is None:
                request.finish_reason = "error"
                request.emit(Event("error", text=f"generation failed: {type(error).__name__}: {error}"))

    # ------------------------------------------------------------ per token
    def advance(self, request: GenerationRequest, token: int) -> None:
        """Book ``token`` for ``request``: stop, send its new text, or finish it."""
        if request.cancelled:
            request.finish_reason = "cancelled"
            self.cancelled_rows += 1
            self.finished.append(("cancelled", len(request.tokens)))
            return
        if token in self.end_ids:
            self._finish(request, "stop")
            return
        request.tokens.append(token)
        stops = request.params.stop + self.record_stops
        if not request.stream and not stops:   # nothing to look for in the text before the end
            if len(request.tokens) >= request.params.max_tokens:
                self._finish(request, "length")
            return
        text = self._text(request)
        for stop in stops:
            at = text.find(stop)
            if at >= 0:
                self._send(request, text[:at])
                self._finish(request, "stop", flush=False)
                return
        if len(request.tokens) >= request.params.max_tokens:
            self._finish(request, "length", text=text)
            return
        if not request.stream:
            return   # the text is decoded again at the end; nothing to send before
        # Hold back what could still become a stop string, and a half-decoded character.
        hold = max((len(s) - 1 for s in stops), default=0)
        safe = len(text) - hold
        safe = min(safe, len(text.rstrip("\ufffd")))
        self._send(request, text[:max(safe, 0)])

    def _text(self, request: GenerationRequest) -> str:
        return self.tokenizer.decode(request.tokens, skip_special_tokens=True).lstrip()

    def _send(self, request: GenerationRequest, text: str) -> None:
        if len(text) > len(request.sent) and text.startswith(request.sent):
            if request.stream:
                request.emit(Event("delta", text=text[len(request.sent):]))
            request.sent = text

    def _finish(self, request: GenerationRequest, reason: str, flush: bool = True, text: str | None = None) -> None:
        if flush:
            self._send(request, self._text(request) if text is None else text)
        request.finish_reason = reason
        self.finished.append((reason, len(request.tokens)))
        done = Event("done", finish_reason=reason, prompt_tokens=request.prompt.num_tokens,
                     completion_tokens=len(request.tokens))
        if request.stream:
            request.emit(done)
        else:
            request.emit(Event("delta", text=request.sent), done)


class ContinuousBatchingEngine(GenerationEngine):
    """Its own decode loop over a running batch that rows join and leave between steps (module docstring)."""

    strategy = "continuous"

    def __init__(self, model, max_batch_size: int = 8, batch_window_s: float = 0.05):
        if not model.supports_continuous_batching():
            raise ValueError(f"{type(model).__name__} with its adapter cannot change a batch's rows between decode "
                             f"steps; serve it with GenerateBatchEngine (create_engine chooses)")
        # transformers >= 5.24 names the cache argument `cache`, earlier ones `past_key_values`.
        forward_args = inspect.signature(model.base_llm.forward).parameters
        self._cache_arg = "cache" if "cache" in forward_args else "past_key_values"
        self._batch: _RunningBatch | None = None
        super().__init__(model, max_batch_size, batch_window_s)

    def _rows(self) -> list[GenerationRequest]:
        return self._batch.requests if self._batch is not None else []

    def _drop_rows(self) -> None:
        self._batch = None

    def _run_arrivals(self, arrivals: list[GenerationRequest]) -> None:
        if arrivals:
            self._join(arrivals)
        if self._batch is not None:
            self._step()

    def _join(self, requests: list[GenerationRequest]) -> None:
        """Prefill ``requests`` together and add their rows to the running batch."""
        try:
            inputs = collate_prompts(self.model, [r.prompt for r in requests], self.device)
            embeds, attention_mask = self.model._prepare_inputs(   # the media of all of them: one pass per encoder
                inputs["input_ids"], inputs["attention_mask"], inputs.get("question_mask"),
                {key: inputs.get(key) for key in MEDIA_INPUT_KEYS.values()})
            cache = DynamicCache()
            output = self.model.llm(inputs_embeds=embeds, attention_mask=attention_mask,
                                    position_ids=position_ids_from_attention_mask(attention_mask),
                                    use_cache=True, logits_to_keep=1, **{self._cache_arg: cache})
            self._count(len(requests), prefill=True)
            rows = _RunningBatch(requests, cache, attention_mask, attention_mask.sum(1),
                                 self._next_tokens(requests, output.logits[:, -1]))
        except Exception as e:  # one bad prefill must not stop the server
            self._fail(requests, e)
            return
        rows = self._book(rows)
        if rows is not None and self._batch is not None:
            self._batch.extend(rows)
        elif rows is not None:
            self._batch = rows

    def _step(self) -> None:
        """One decode step of every running row."""
        batch = self._batch
        try:
            batch.attention_mask = torch.cat([batch.attention_mask, batch.attention_mask.new_ones(len(batch), 1)], 1)
            output = self.model.llm(input_ids=batch.last_tokens[:, None], attention_mask=batch.attention_mask,
                                    position_ids=batch.positions[:, None], use_cache=True,
                                    **{self._cache_arg: batch.cache})
            self._count(len(batch), prefill=False)
            batch.positions = batch.positions + 1
            batch.last_tokens = self._next_tokens(batch.requests, output.logits[:, -1])
        except Exception as e:  # the running rows are lost; the server goes on
            self._drop_rows()
            self._fail(batch.requests, e)
            return
        self._batch = self._book(batch)

    def _next_tokens(self, requests: list[GenerationRequest], logits: torch.Tensor) -> torch.Tensor:
        """Each row's next token: greedy argmax, or sampled with the row's temperature and top-p."""
        logits = logits.float()
        early = [i for i, r in enumerate(requests) if len(r.tokens) < r.params.min_tokens]
        if early:   # no end token before min_tokens
            end_ids = torch.tensor(sorted(self.end_ids), device=logits.device)
            logits[torch.tensor(early, device=logits.device)[:, None], end_ids] = float("-inf")
        tokens = logits.argmax(-1)
        for i, request in enumerate(requests):
            if not request.params.greedy:
                tokens[i] = _sample(logits[i], request.params.temperature, request.params.top_p)
        return tokens

    def _book(self, batch: _RunningBatch) -> _RunningBatch | None:
        """Book every row's newest token; the batch without the rows that finished (None if none is left)."""
        keep = []
        for i, (request, token) in enumerate(zip(batch.requests, batch.last_tokens.tolist())):
            self.advance(request, token)
            if request.finish_reason is None:
                keep.append(i)
        if not keep:
            return None
        if len(keep) < len(batch):
            batch.keep(keep)
        return batch


class _RowStops(StoppingCriteria):
    """``generate``'s per-token hook: books every unfinished row's newest token; returns which rows are done."""

    def __init__(self, engine: GenerationEngine, requests: list[GenerationRequest]):
        self.engine = engine
        self.requests = requests

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        done = []
        for request, token in zip(self.requests, input_ids[:, -1].tolist()):
            if request.finish_reason is None:
                self.engine.advance(request, token)
            done.append(request.finish_reason is not None)
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


class GenerateBatchEngine(GenerationEngine):
    """Each batch is one left-padded ``MultimodalLM.generate`` call (module docstring): for models
    whose batch rows must stay the same from the prompt pass to the last decode step."""

    strategy = "generate batches"

    def __init__(self, model, max_batch_size: int = 8, batch_window_s: float = 0.05):
        self._in_call: list[GenerationRequest] = []   # the rows of the generate call in progress
        super().__init__(model, max_batch_size, batch_window_s)

    def _rows(self) -> list[GenerationRequest]:
        return self._in_call

    def _drop_rows(self) -> None:
        self._in_call = []

    def _run_arrivals(self, arrivals: list[GenerationRequest]) -> None:
        if not arrivals:
            return
        # One generate call takes one set of sampling arguments: the others wait for the next batch.
        key = arrivals[0].params.batch_key()
        batch = [r for r in arrivals if r.params.batch_key() == key]
        self._waiting = [r for r in arrivals if r.params.batch_key() != key] + self._waiting
        self._in_call = batch
        self._count(len(batch), prefill=True)
        try:
            inputs = collate_prompts(self.model, [r.prompt for r in batch], self.device)
            params = batch[0].params
            kwargs = {"max_new_tokens": max(r.params.max_tokens for r in batch),
                      "min_new_tokens": params.min_tokens or None,
                      "eos_token_id": sorted(self.end_ids), "pad_token_id": self.tokenizer.pad_token_id,
                      "stopping_criteria": StoppingCriteriaList([_RowStops(self, batch)])}
            if params.greedy:
                kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
            else:
                kwargs.update(do_sample=True, temperature=params.temperature, top_p=params.top_p)
            self.model.generate(**inputs, **kwargs)
            for request in batch:
                if request.finish_reason is None:
                    self._finish(request, "length")
        except Exception as e:  # one bad batch must not stop the server
            self._fail(batch, e)
        finally:
            self._in_call = []


def create_engine(model, max_batch_size: int = 8, batch_window_s: float = 0.05) -> GenerationEngine:
    """Continuous batching where the model allows it (``MultimodalLM.supports_continuous_batching``),
    else one ``generate`` call per batch; the choice is logged."""
    engine_class = ContinuousBatchingEngine if model.supports_continuous_batching() else GenerateBatchEngine
    engine = engine_class(model, max_batch_size, batch_window_s)
    logger.info("batching: %s (up to %d rows, window %g ms)%s", engine.strategy, max_batch_size,
                batch_window_s * 1000, "" if engine_class is ContinuousBatchingEngine else
                f"; {type(model).__name__} with its adapter keeps each batch's rows from prompt to last token")
    return engine


def _sample(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """One token from ``logits`` (V,) at ``temperature``, from the smallest set of mass >= ``top_p``."""
    probs = torch.softmax(logits / temperature, -1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        outside = sorted_probs.cumsum(-1) - sorted_probs > top_p   # mass before this token already enough
        sorted_probs[outside] = 0
        probs = torch.zeros_like(probs).scatter(0, order, sorted_probs)
    return torch.multinomial(probs, 1)[0]


__all__ = ["ContinuousBatchingEngine", "Event", "GenerateBatchEngine", "GenerationEngine", "GenerationRequest",
           "SamplingParams", "create_engine"]
