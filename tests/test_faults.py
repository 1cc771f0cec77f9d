"""Faults inside the engine (reliability/faults.py hook): the affected request fails with
a typed error, its batch-mates' outputs are bitwise those of a run without the fault,
and no KV block leaks. A fatal error kills the engine without hanging anyone."""
from __future__ import annotations

import asyncio
import random
from collections.abc import Iterator
from pathlib import Path

import pytest

from asyncengine.async_engine import AsyncEngine, EngineDeadError
from asyncengine.config import EngineConfig
from asyncengine.engine_core import EngineCore
from asyncengine.reliability.errors import QueueTimeoutError, RequestFailedError
from asyncengine.reliability.faults import FaultHook
from asyncengine.sampling_params import SamplingParams
from tests.invariance_harness import Req, make_engine, random_prompt, run, sampled

VOCAB = 384


@pytest.fixture(scope="module")
def core(llama_dir: Path) -> Iterator[EngineCore]:
    yield make_engine(llama_dir, num_threads=1, num_kv_blocks=128, max_num_seqs=8)


def _use(core: EngineCore, hook: FaultHook | None) -> None:
    core.faults = core.runner.faults = hook


def _requests(with_victim: bool) -> list[Req]:
    rng = random.Random(7)
    reqs = [Req(f"ok{i}", random_prompt(rng, 20 + 9 * i, VOCAB), sampled(i, 6), arrival_step=i % 2) for i in range(4)]
    if with_victim:  # joins the batch mid-way, alongside the others
        reqs.append(Req("victim", random_prompt(rng, 30, VOCAB), sampled(9, 6), arrival_step=1))
    return reqs


def _clean(core: EngineCore) -> bool:
    s = core.stats()
    return not core.requests and s["num_free_blocks"] == s["num_total_blocks"]


@pytest.mark.parametrize(("hook", "code"), [
    (FaultHook(forward_raises_for=("victim",)), "forward_error"),
    (FaultHook(nan_logits_for=("victim",)), "nonfinite_logits"),
    (FaultHook(detokenize_raises_for=("victim",)), "detokenizer_error"),
])
def test_one_request_fails_the_others_are_unchanged(core: EngineCore, hook: FaultHook, code: str) -> None:
    _use(core, None)
    want = run(core, _requests(with_victim=False))
    failed_before = core.num_failed
    outputs = []
    original_step = core.step

    def recording_step():  # type: ignore[no-untyped-def]
        outs = original_step()
        outputs.extend(outs)
        return outs

    _use(core, hook)
    core.step = recording_step  # type: ignore[method-assign]
    try:
        got = run(core, _requests(with_victim=True))
    finally:
        del core.step
        _use(core, None)
    assert got.pop("victim").finish_reason == "error"
    assert got == want  # tokens, logprobs, top logprobs, finish reasons: bit for bit
    [err] = [o for o in outputs if o.error is not None]
    assert (err.request_id, err.error_code, err.finished) == ("victim", code, True)
    assert core.num_failed == failed_before + 1
    assert _clean(core)


def test_transient_forward_error_is_retried_without_changing_outputs(core: EngineCore) -> None:
    _use(core, None)
    want = run(core, _requests(with_victim=True))
    hook = FaultHook(forward_raises_at_steps=frozenset({1 + core.num_steps, 3 + core.num_steps}))
    _use(core, hook)
    try:
        got = run(core, _requests(with_victim=True))
    finally:
        _use(core, None)
    assert len(hook.fired) == 2  # both faults fired, each step retried request by request
    assert got == want
    assert _clean(core)


def test_failed_request_leaves_nothing_in_the_prefix_cache(core: EngineCore) -> None:
    """A request whose first forward failed never cached its blocks: the same prompt
    afterwards computes everything itself (no hit on KV of a failed forward)."""
    prompt = random_prompt(random.Random(3), 48, VOCAB)
    core.reset_prefix_cache()
    _use(core, FaultHook(forward_raises_for=("bad",)))
    try:
        assert run(core, [Req("bad", prompt, sampled(1, 3))])["bad"].finish_reason == "error"
    finally:
        _use(core, None)
    core.add_request("again", list(prompt), sampled(1, 3))
    outs = core.step()
    assert outs[0].num_cached_tokens == 0
    core.abort(["again"])
    assert _clean(core)


def test_queue_timeout_fails_waiting_requests_only(llama_dir: Path) -> None:
    core = make_engine(llama_dir, num_threads=1, num_kv_blocks=64, max_num_seqs=1, max_queue_seconds=0.05)
    core.add_request("first", list(range(3, 20)), SamplingParams(max_tokens=4, temperature=0))
    core.step()  # "first" is running; "late" waits behind it (max_num_seqs=1)
    core.add_request("late", list(range(5, 25)), SamplingParams(max_tokens=4, temperature=0))
    core.requests["late"].arrival_time -= 1.0
    outs = {o.request_id: o for o in core.step()}
    assert outs["late"].error_code == "queue_timeout" and outs["late"].finish_reason == "error"
    assert outs["first"].error is None and core.num_queue_timeouts == 1
    while core.has_unfinished():
        core.step()
    assert _clean(core)


def _config(model_dir: Path, **kw: object) -> EngineConfig:
    return EngineConfig(model=str(model_dir), num_threads=1, num_kv_blocks=128, **kw)  # type: ignore[arg-type]


async def _collect(engine: AsyncEngine, prompt: list[int], rid: str) -> list[int]:
    tokens: list[int] = []
    async for out in engine.generate(prompt, SamplingParams(max_tokens=40, temperature=0, ignore_eos=True), rid):
        tokens += out.token_ids
    return tokens


async def test_async_failed_request_raises_typed_error(llama_dir: Path) -> None:
    engine = AsyncEngine.from_config(_config(llama_dir),
                                     faults=FaultHook(nan_logits_for=("victim",)))
    try:
        ok, bad = await asyncio.gather(_collect(engine, [5, 6, 7], "fine"), _collect(engine, [5, 6, 7], "victim"),
                                       return_exceptions=True)
        assert isinstance(ok, list) and len(ok) == 40
        assert isinstance(bad, RequestFailedError) and bad.code == "nonfinite_logits"
        assert engine.is_healthy and engine.stats()["num_failed"] == 1
    finally:
        engine.shutdown()


async def test_async_queue_timeout_while_paused(llama_dir: Path) -> None:
    engine = AsyncEngine.from_config(_config(llama_dir, max_queue_seconds=0.1))
    try:
        await engine.pause()
        with pytest.raises(QueueTimeoutError):
            await asyncio.wait_for(_collect(engine, [5, 6, 7], "q"), 10)
        assert engine.stats()["num_queue_timeouts"] == 1
        await engine.resume()
        assert len(await _collect(engine, [5, 6, 7], "after")) == 40
    finally:
        engine.shutdown()


async def test_fatal_error_fails_everyone_and_nothing_hangs(llama_dir: Path) -> None:
    hook = FaultHook()
    engine = AsyncEngine.from_config(_config(llama_dir), faults=hook)
    try:
        hook.fatal_at_step = engine.core.num_steps + 3
        results = await asyncio.wait_for(asyncio.gather(
            *(_collect(engine, [5, 6, 7 + i], f"r{i}") for i in range(3)), return_exceptions=True), 30)
        assert all(isinstance(r, EngineDeadError) for r in results), results
        assert not engine.is_healthy and "injected fatal" in repr(engine.dead_error)
        with pytest.raises(EngineDeadError):
            await asyncio.wait_for(_collect(engine, [5], "late"), 10)
        with pytest.raises(EngineDeadError):
            await asyncio.wait_for(engine.pause(), 10)
    finally:
        engine.shutdown()
