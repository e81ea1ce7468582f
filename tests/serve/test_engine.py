"""The generation engine: continuous batching (rows join a running decode loop and leave it on their own),
and generate batches for models whose rows must stay together (DeLo).

Driven directly (no HTTP) with the tiny image + audio model: every greedy answer, however it was
batched, equals what ``MultimodalLM.generate`` gives for the prompt alone, token for token.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from mllm.serve.engine import (
    ContinuousBatchingEngine,
    GenerateBatchEngine,
    GenerationRequest,
    SamplingParams,
    _Pace,
    create_engine,
)
from mllm.serve.inputs import Limits, build_prompt, collate_prompts, decode_media
from tests.serve.conftest import png_bytes, run_requests, wav_bytes


def _prompt(model, text: str, media: dict[str, list[bytes]]):
    items = {field: [decode_media(model.processor, field, data, field, Limits()) for data in datas]
             for field, datas in media.items()}
    return build_prompt(model, [{"role": "user", "content": text}], items)


@pytest.fixture(scope="module")
def prompts(served_model):
    """Prompts of different lengths and media mixes (so rows are left-padded differently)."""
    return [
        _prompt(served_model, "<image>\nWhat color is the shape?", {"image": [png_bytes("blue", shape="square")]}),
        _prompt(served_model, "<image>\n<audio>\nHow many beeps, and which shape do you see here?",
                {"image": [png_bytes()], "audio": [wav_bytes(1.5, 880)]}),
        _prompt(served_model, "Say something.", {}),
        _prompt(served_model, "<audio>\nWhat do you hear?", {"audio": [wav_bytes(1.0, 440)]}),
    ]


def _alone(model, prompt, max_tokens: int) -> list[int]:
    """Greedy new token ids of ``MultimodalLM.generate`` for this prompt alone (end id excluded)."""
    batch = collate_prompts(model, [prompt], "cpu")
    tokens = model.generate(**batch, max_new_tokens=max_tokens, min_new_tokens=max_tokens, do_sample=False)[0]
    return tokens.tolist()


@pytest.fixture
def engine(served_model):
    engine = ContinuousBatchingEngine(served_model, max_batch_size=4, batch_window_s=0.05)
    yield engine
    engine.close()


def test_batched_rows_equal_each_prompt_alone(served_model, prompts, engine):
    # min_tokens = max_tokens: every row runs its full length, so the comparison covers every step.
    params = SamplingParams(max_tokens=10, min_tokens=10)
    requests, _ = asyncio.run(run_requests(engine, [(0, p, params) for p in prompts]))
    assert max(engine.prefill_sizes) > 1          # they were prefilled together
    for request, prompt in zip(requests, prompts):
        assert request.tokens == _alone(served_model, prompt, 10)
        assert request.finish_reason == "length"


def test_request_arriving_mid_decode_joins_the_running_batch(served_model, prompts, engine):
    long = SamplingParams(max_tokens=40, min_tokens=40)
    short = SamplingParams(max_tokens=6, min_tokens=6)

    async def scenario():
        loop = asyncio.get_running_loop()
        first = GenerationRequest(prompts[1], long, loop)
        engine.submit(first)
        while len(first.tokens) < 5:              # the first row is decoding
            await asyncio.sleep(0.005)
        requests, _ = await run_requests(engine, [(0, prompts[0], short), (0, prompts[2], short)])
        first_still_running = first.finish_reason is None
        while (await first.events.get()).kind not in ("done", "error"):
            pass
        return first, requests, first_still_running

    first, (second, third), first_still_running = asyncio.run(scenario())
    # The newcomers joined the running row (steps with more than one row) instead of waiting for it ...
    assert max(engine.batch_sizes) >= 2 and engine.prefill_sizes[0] == 1
    # ... and left before it: a short answer does not wait for the batch's longest.
    assert first_still_running and second.finish_reason == third.finish_reason == "length"
    assert first.finish_reason == "length" and len(first.tokens) == 40
    # Token for token what each prompt gives alone.
    assert first.tokens == _alone(served_model, prompts[1], 40)
    assert second.tokens == _alone(served_model, prompts[0], 6)
    assert third.tokens == _alone(served_model, prompts[2], 6)


def test_rows_keep_their_own_sampling_settings(served_model, prompts, engine):
    """A sampled row and a greedy row share steps; the greedy one is unaffected."""
    greedy = SamplingParams(max_tokens=8, min_tokens=8)
    sampled = SamplingParams(max_tokens=8, min_tokens=8, temperature=1.5, top_p=0.9)
    requests, _ = asyncio.run(run_requests(engine, [(0, prompts[0], sampled), (0, prompts[3], greedy)]))
    assert len(requests[0].tokens) == 8
    assert requests[1].tokens == _alone(served_model, prompts[3], 8)


def test_cancelled_row_leaves_and_the_others_go_on(served_model, prompts, engine):
    params = SamplingParams(max_tokens=30, min_tokens=30)

    async def scenario():
        loop = asyncio.get_running_loop()
        doomed, kept = GenerationRequest(prompts[0], params, loop), GenerationRequest(prompts[2], params, loop)
        engine.submit(doomed)
        engine.submit(kept)
        while len(doomed.tokens) < 3:
            await asyncio.sleep(0.005)
        doomed.cancel()
        while (await kept.events.get()).kind not in ("done", "error"):
            pass
        return doomed, kept

    doomed, kept = asyncio.run(scenario())
    assert doomed.finish_reason == "cancelled" and len(doomed.tokens) < 30
    assert kept.tokens == _alone(served_model, prompts[2], 30)


def _adapted_prompts(model, tuner: dict, adapter_marker: str, seed: int) -> list:
    """Apply ``tuner`` with its zero-initialised up-projections (names containing ``adapter_marker``)
    drawn at random, so that the adapter changes the answers; three prompts of different lengths."""
    import torch

    from mllm.config import TunerConfig

    model.apply_tuner(TunerConfig(**tuner))
    torch.manual_seed(seed)
    with torch.no_grad():
        perturbed = [p.normal_(0, 0.5) for name, p in model.llm.named_parameters() if adapter_marker in name]
    assert perturbed
    model.eval()
    return [_prompt(model, "<image>\nWhat color is the shape?", {"image": [png_bytes("blue", shape="square")]}),
            _prompt(model, "Say something about shapes and colors, please.", {}),
            _prompt(model, "<image>\nWhich shape?", {"image": [png_bytes("green")]})]


def _two_then_one_late(engine, prompts, params) -> list:
    """The first two prompts together, the third submitted once the first row is decoding."""

    async def scenario():
        loop = asyncio.get_running_loop()
        first = [GenerationRequest(p, params, loop) for p in prompts[:2]]
        for request in first:
            engine.submit(request)
        while len(first[0].tokens) < 3:
            await asyncio.sleep(0.005)
        (late,), _ = await run_requests(engine, [(0, prompts[2], params)])
        for request in first:
            while (await request.events.get()).kind not in ("done", "error"):
                pass
        return [*first, late]

    try:
        return asyncio.run(scenario())
    finally:
        engine.close()


def test_moka_rows_equal_each_prompt_alone(tiny_model):
    """MokA routes every token by its modality: prompt rows (image + text) and decode steps (text)
    must see the same ids in the engine's own loop as in ``generate``."""
    from tests.eval_suites.test_runner import MOKA

    prompts = _adapted_prompts(tiny_model, MOKA, "moka_B", seed=1)
    engine = ContinuousBatchingEngine(tiny_model, max_batch_size=4, batch_window_s=0.05)
    requests = _two_then_one_late(engine, prompts, SamplingParams(max_tokens=12, min_tokens=12))
    assert max(engine.batch_sizes) == 3         # the late one joined the running rows
    for request, prompt in zip(requests, prompts):
        assert request.tokens == _alone(tiny_model, prompt, 12)


def test_engine_choice_follows_the_model(tiny_model, served_model):
    """Continuous batching for a plain LM and for adapters without per-sample decode state (LoRA,
    MokA); one ``generate`` call per batch for DeLo, whose prompt pass's routing holds per sample
    for the decode steps -- and the continuous engine refuses such a model outright."""
    from mllm.config import TunerConfig
    from tests.train.test_qlora import DELO

    assert served_model.supports_continuous_batching()
    tiny_model.apply_tuner(TunerConfig(**DELO))
    assert not tiny_model.supports_continuous_batching()
    with pytest.raises(ValueError, match="GenerateBatchEngine"):
        ContinuousBatchingEngine(tiny_model)
    engine = create_engine(tiny_model)
    try:
        assert isinstance(engine, GenerateBatchEngine)
    finally:
        engine.close()


def test_delo_rows_batched_together_equal_each_prompt_alone(tiny_model):
    """DeLo routes each sample by the prompt pass's pooled features: batched through ``generate``
    (several rows, a second batch while the first decodes), every row equals its prompt alone."""
    from tests.train.test_qlora import DELO

    prompts = _adapted_prompts(tiny_model, DELO, "delo_pools", seed=2)
    engine = create_engine(tiny_model, max_batch_size=4, batch_window_s=0.05)
    requests = _two_then_one_late(engine, prompts, SamplingParams(max_tokens=10, min_tokens=10))
    assert isinstance(engine, GenerateBatchEngine)
    assert engine.batch_sizes == [2, 1]        # the late one did not join the running rows
    alone = [_alone(tiny_model, prompt, 10) for prompt in prompts]
    assert [r.tokens for r in requests] == alone
    assert alone[0] != alone[2] or alone[1] != alone[2]   # the rows are not all the same answer


def test_the_pipelining_rule_weighs_the_server_against_a_lone_request(monkeypatch):
    """``_Pace``: a lone request's busy spell is timed (spells of several are not), and halves pay
    once the server's CPU time for the load is at least twice a lone request's."""
    clock = iter([10.0, 10.2, 20.0, 21.0])   # a spell of 0.2 s with one request, then one of 1 s with two
    monkeypatch.setattr("mllm.serve.engine.time.monotonic", lambda: next(clock))
    pace = _Pace()
    assert not pace.pipelining_pays(16)          # nothing measured yet
    pace.started(1)
    pace.idle()
    pace.started(2)
    pace.idle()
    assert pace.lone_s == pytest.approx(0.2)
    pace.server_s = 0.025
    assert pace.pipelining_pays(16) and not pace.pipelining_pays(15)   # 16 * 0.025 = 2 * 0.2


@pytest.mark.parametrize("server_s", [1.0, 1e-6])
def test_an_idle_model_starts_with_half_the_load_when_the_server_is_the_slower_stage(served_model, prompts, server_s):
    """Four requests announced. When the server reports a second of CPU per request, far more than a
    lone request takes the model, the model starts as soon as two are in and the two later ones get
    their own prefill; when the server is quick, the batch waits for all four. Every answer equals
    its prompt alone either way."""
    engine = ContinuousBatchingEngine(served_model, max_batch_size=4, batch_window_s=60.0)
    params = SamplingParams(max_tokens=4, min_tokens=4)
    pipelined = server_s == 1.0

    async def scenario():
        await run_requests(engine, [(0, prompts[2], params)])    # a lone request: the model's time for one
        loop = asyncio.get_running_loop()
        requests = [GenerationRequest(p, params, loop) for p in prompts]
        for _ in requests:
            engine.announce()
        for request in requests[:2]:
            engine.submit(request, announced=True, server_s=server_s)
        for _ in range(100 if pipelined else 10):   # up to 3 s for the half in to start (the window is 60 s)
            if len(engine.prefill_sizes) == 2:
                break
            await asyncio.sleep(0.03)
        started_early = len(engine.prefill_sizes) == 2
        for request in requests[2:]:
            engine.submit(request, announced=True, server_s=server_s)
        for request in requests:
            while (await request.events.get()).kind not in ("done", "error"):
                pass
        return requests, started_early

    try:
        requests, started_early = asyncio.run(scenario())
    finally:
        engine.close()
    assert engine.pace.lone_s is not None and started_early == pipelined
    assert engine.prefill_sizes[:2] == ([1, 2] if pipelined else [1, 4]) and sum(engine.prefill_sizes) == 5
    for request, prompt in zip(requests, prompts):
        assert request.tokens == _alone(served_model, prompt, 4)


def test_stats_count_every_forward_while_the_recent_sizes_stay_bounded(prompts, engine, monkeypatch):
    import mllm.serve.engine as engine_module

    monkeypatch.setattr(engine_module, "_RECENT_MAX", 6)
    params = SamplingParams(max_tokens=5, min_tokens=5)
    asyncio.run(run_requests(engine, [(0.0, prompt, params) for prompt in prompts] + [(0.3, prompts[0], params)]))
    for _ in range(100):   # the worker drops a finished batch just after sending its last "done"
        stats = engine.stats()
        if stats["running"] == 0:
            break
        time.sleep(0.05)
    # 5 requests of 5 tokens: each token of each row came from one forward (the prefill gives the first).
    assert stats["prefilled_requests"] == 5 and stats["batched_requests"] == 25
    assert stats["batches"] > 6 and len(engine.batch_sizes) <= 6
    assert stats["running"] == 0 and stats["queued"] == 0 and stats["cancelled"] == 0
