"""AsyncEngine: the actor around EngineCore (tiny random Llama, one torch thread)."""
from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import pytest

from asyncengine.async_engine import AsyncEngine, EngineDeadError
from asyncengine.config import EngineConfig
from asyncengine.engine_core import EngineCore, EngineOverloadedError
from asyncengine.outputs import CompletionResult
from asyncengine.sampling_params import InvalidRequestError, SamplingParams

PROMPT = list(range(40, 60))  # 20 tokens: one full 16-token block for the prefix cache


def _config(model_dir: Path, **kw: object) -> EngineConfig:
    # One torch thread: tiny matmuls on two contended cores are far faster that way.
    base = dict(model=str(model_dir), num_kv_blocks=128, max_model_len=256, num_threads=1)
    base.update(kw)
    return EngineConfig(**base)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def engine(llama_dir: Path):
    eng = AsyncEngine.from_config(_config(llama_dir))
    yield eng
    eng.shutdown()


async def _collect(eng: AsyncEngine, prompt: list[int] | str, sp: SamplingParams) -> CompletionResult:
    res = CompletionResult(request_id="", prompt_token_ids=[])
    async for out in eng.generate(prompt, sp):
        res.add(out)
    return res


async def _wait_idle(eng: AsyncEngine) -> dict[str, float]:
    """The stats once no request runs or waits (bounded wait, no timing assert)."""
    for _ in range(500):
        s = eng.stats()
        if s["num_running"] == 0 and s["num_waiting"] == 0:
            return s
        await asyncio.sleep(0.01)
    raise AssertionError(f"engine did not go idle: {eng.stats()}")


async def test_generate_equals_engine_core(engine: AsyncEngine, llama_dir: Path) -> None:
    sps = [SamplingParams(max_tokens=12, seed=i, temperature=0.8, logprobs=2) for i in range(4)]
    got = await asyncio.gather(*(_collect(engine, PROMPT, sp) for sp in sps))
    core = EngineCore(_config(llama_dir))
    for i, sp in enumerate(sps):
        core.add_request(str(i), PROMPT, sp)
    want = {str(i): CompletionResult(request_id=str(i), prompt_token_ids=PROMPT) for i in range(4)}
    while core.has_unfinished():
        for out in core.step():
            want[out.request_id].add(out)
    for i, res in enumerate(got):
        ref = want[str(i)]
        assert (res.token_ids, res.logprobs, res.top_logprobs) == (ref.token_ids, ref.logprobs, ref.top_logprobs)
        assert res.text == ref.text and res.finish_reason == ref.finish_reason


async def test_text_prompt_and_deltas(engine: AsyncEngine) -> None:
    deltas = [out async for out in engine.generate("Hello world", SamplingParams(max_tokens=5, seed=0))]
    assert deltas[-1].finished and sum(len(d.token_ids) for d in deltas) == deltas[-1].num_output_tokens
    assert deltas[-1].num_prompt_tokens == len(engine.encode("Hello world"))
    assert all(d.weight_versions == [0] * len(d.token_ids) for d in deltas)


async def test_errors_raise_before_any_output(engine: AsyncEngine) -> None:
    with pytest.raises(InvalidRequestError) as e:
        async for _ in engine.generate([100_000], SamplingParams()):
            pytest.fail("no output expected")
    assert e.value.param == "prompt"
    with pytest.raises(InvalidRequestError) as e:
        await engine.add_request(PROMPT, SamplingParams(max_tokens=1000))
    assert e.value.param == "max_tokens"
    stream = await engine.add_request(PROMPT, SamplingParams(max_tokens=50), request_id="dup")
    with pytest.raises(InvalidRequestError):
        await engine.add_request(PROMPT, SamplingParams(), request_id="dup")
    stream.abort()
    await _wait_idle(engine)


async def test_closing_consumer_aborts_and_frees_blocks(engine: AsyncEngine) -> None:
    gen = engine.generate(PROMPT, SamplingParams(max_tokens=200, ignore_eos=True, seed=1))
    async for _ in gen:
        break
    await gen.aclose()
    s = await _wait_idle(engine)
    assert s["num_free_blocks"] == s["num_total_blocks"]


async def test_cancelled_task_aborts_and_frees_blocks(engine: AsyncEngine) -> None:
    started = asyncio.Event()

    async def consume() -> None:
        async for _ in engine.generate(PROMPT, SamplingParams(max_tokens=200, ignore_eos=True)):
            started.set()

    tasks = [asyncio.create_task(consume()) for _ in range(4)]
    await started.wait()
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    s = await _wait_idle(engine)
    assert s["num_free_blocks"] == s["num_total_blocks"]


async def test_steps_run_off_the_event_loop(engine: AsyncEngine) -> None:
    """While a step is blocked, the loop keeps running coroutines; then the step finishes."""
    core = engine.core
    release = threading.Event()
    threads: list[int] = []
    original = core.step

    def slow_step():  # type: ignore[no-untyped-def]
        threads.append(threading.get_ident())
        release.wait(10)
        return original()

    core.step = slow_step  # type: ignore[method-assign]
    try:
        task = asyncio.create_task(_collect(engine, PROMPT, SamplingParams(max_tokens=3, seed=0)))
        while not threads:
            await asyncio.sleep(0.005)  # the loop runs while the engine thread is inside step()
        release.set()
        res = await task
    finally:
        core.step = original  # type: ignore[method-assign]
    assert len(res.token_ids) == 3
    assert threading.get_ident() not in threads


async def test_idle_engine_does_not_step(engine: AsyncEngine) -> None:
    await _collect(engine, PROMPT, SamplingParams(max_tokens=2))
    await _wait_idle(engine)
    steps = engine.num_steps
    await asyncio.sleep(0.1)
    assert engine.num_steps == steps


async def test_reset_prefix_cache(engine: AsyncEngine) -> None:
    # max_tokens > 1: EngineCore caches blocks only of requests still running after a step.
    sp = SamplingParams(max_tokens=3, seed=0)
    prompt = list(range(100, 140))
    await _collect(engine, prompt, sp)
    hits = engine.stats()["prefix_hit_tokens"]
    await _collect(engine, prompt, sp)
    assert engine.stats()["prefix_hit_tokens"] > hits
    await engine.reset_prefix_cache()
    hits = engine.stats()["prefix_hit_tokens"]
    await _collect(engine, prompt, sp)
    assert engine.stats()["prefix_hit_tokens"] == hits


async def test_call_runs_on_the_engine_thread(engine: AsyncEngine) -> None:
    ident = await engine.call(lambda core: (threading.get_ident(), core.weight_version))
    assert ident[0] != threading.get_ident() and ident[1] == 0
    with pytest.raises(ZeroDivisionError):
        await engine.call(lambda core: 1 / 0)
    assert engine.is_healthy


async def test_overload_and_pause(llama_dir: Path) -> None:
    eng = AsyncEngine.from_config(_config(llama_dir, max_waiting=2))
    try:
        await eng.pause()
        assert eng.is_paused()
        streams = [await eng.add_request(PROMPT, SamplingParams(max_tokens=3, seed=i)) for i in range(2)]
        with pytest.raises(EngineOverloadedError):
            await eng.add_request(PROMPT, SamplingParams())
        await eng.resume()
        for s in streams:  # nothing was lost while paused
            outs = [o async for o in s]
            assert outs[-1].finish_reason == "length"
    finally:
        eng.shutdown()


async def test_fatal_step_error_fails_requests_and_reports_unhealthy(llama_dir: Path) -> None:
    eng = AsyncEngine.from_config(_config(llama_dir))
    original = eng.core.step
    calls = []

    def failing_step():  # type: ignore[no-untyped-def]
        calls.append(1)
        if len(calls) > 3:
            raise RuntimeError("boom")
        return original()

    eng.core.step = failing_step  # type: ignore[method-assign]
    results = await asyncio.gather(
        *(_collect(eng, PROMPT, SamplingParams(max_tokens=50, ignore_eos=True)) for _ in range(3)),
        return_exceptions=True,
    )
    assert all(isinstance(r, EngineDeadError) for r in results)
    assert not eng.is_healthy and isinstance(eng.dead_error, RuntimeError)
    with pytest.raises(EngineDeadError):
        await eng.add_request(PROMPT, SamplingParams())
    eng.shutdown()


async def test_shutdown_finishes_in_flight_requests_with_abort(llama_dir: Path) -> None:
    eng = AsyncEngine.from_config(_config(llama_dir))
    stream = await eng.add_request(PROMPT, SamplingParams(max_tokens=200, ignore_eos=True))
    it = aiter(stream)
    first = await anext(it)
    assert not first.finished
    eng.shutdown()
    assert not eng.is_healthy
    outs = [o async for o in it]
    assert outs[-1].finished and outs[-1].finish_reason == "abort"
    with pytest.raises(EngineDeadError):
        await eng.add_request(PROMPT, SamplingParams())
