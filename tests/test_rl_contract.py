"""The weight-update contract through AsyncEngine: updates with requests in flight, pause modes."""
from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import save

from asyncengine.async_engine import AsyncEngine
from asyncengine.config import EngineConfig
from asyncengine.models.weights import WeightLoadError, read_safetensors
from asyncengine.outputs import CompletionResult
from asyncengine.sampling_params import SamplingParams
from tests.step_gate import TIMEOUT_S, StepGate, all_running
from tests.tiny_models import make_model_dir

PROMPT = list(range(10, 40))
MAX_TOKENS = 48


@pytest.fixture(scope="module")
def new_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_model_dir(tmp_path_factory.mktemp("v1") / "llama", "llama", seed=123)


@pytest.fixture
async def engine(llama_dir: Path) -> AsyncIterator[AsyncEngine]:
    eng = AsyncEngine.from_config(EngineConfig(model=str(llama_dir), num_kv_blocks=256, max_model_len=256,
                                               num_threads=1))
    yield eng
    eng.shutdown()


def params(i: int, max_tokens: int = MAX_TOKENS) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0 if i % 2 else 0.9, seed=i, ignore_eos=True)


async def collect(eng: AsyncEngine, prompt: list[int], sp: SamplingParams, res: CompletionResult) -> CompletionResult:
    async for out in eng.generate(prompt, sp):
        res.add(out)
    return res


async def until(cond: Callable[[], bool], what: str) -> None:
    for _ in range(int(TIMEOUT_S * 1000)):
        if cond():
            return
        await asyncio.sleep(0.001)
    raise AssertionError(f"{what} did not happen in {TIMEOUT_S} s")


async def start(eng: AsyncEngine, n: int = 16, max_tokens: int = MAX_TOKENS,
                ) -> tuple[StepGate, list[asyncio.Task[CompletionResult]]]:
    """n requests in flight; the step thread held at the first boundary where each has
    at least one token out (and none has finished): the next command lands there. They
    are queued while the engine is paused and admitted together at resume: started one
    by one, a loaded machine could run the first to its end before the loop started the
    last, and the gate's condition would never hold."""
    gate = StepGate(eng, all_running(n))
    await eng.pause("keep")
    results = [CompletionResult(request_id=str(i), prompt_token_ids=PROMPT[: 10 + i]) for i in range(n)]
    tasks = [asyncio.create_task(collect(eng, r.prompt_token_ids, params(i, max_tokens), r))
             for i, r in enumerate(results)]
    await until(lambda: eng.stats()["num_paused_requests"] == n, f"queueing {n} requests")
    await eng.resume()
    await gate.wait()
    return gate, tasks


def assert_versions_split(res: CompletionResult, old: int, new: int) -> None:
    v = res.weight_versions
    assert len(v) == len(res.token_ids) and v == sorted(v), v
    assert v[0] == old and v[-1] == new and set(v) == {old, new}, v


async def test_keep_with_16_in_flight_tags_tokens_v0_then_v1(engine: AsyncEngine, new_dir: Path) -> None:
    gate, tasks = await start(engine)
    await (await gate.land(engine.pause("keep")))  # every request now has v0 tokens and more to come
    assert await engine.update_weights(new_dir, "keep") == 1 == engine.weight_version
    await engine.resume()
    for r in await asyncio.gather(*tasks):
        assert r.finish_reason == "length" and len(r.token_ids) == MAX_TOKENS
        assert_versions_split(r, 0, 1)


async def test_keep_without_pause_never_mixes_versions_in_a_step(engine: AsyncEngine, new_dir: Path) -> None:
    """Each step's tokens carry one version; every step before the landing boundary v0,
    every step after it v1, and all 16 requests straddle it."""
    gate, tasks = await start(engine)
    assert await (await gate.land(engine.update_weights(read_safetensors(new_dir), "keep"))) == 1
    done = await asyncio.gather(*tasks)
    for r in done:
        assert r.finish_reason == "length" and len(r.token_ids) == MAX_TOKENS
        assert_versions_split(r, 0, 1)
    steps = [v for v in gate.step_versions if v]
    assert all(len(v) == 1 for v in steps), steps
    flat = [min(v) for v in steps]
    assert flat == sorted(flat) and flat[0] == 0 and flat[-1] == 1


async def test_abort_returns_16_partial_outputs(engine: AsyncEngine, new_dir: Path) -> None:
    gate, tasks = await start(engine)
    await (await gate.land(engine.update_weights(new_dir, "abort")))
    for r in await asyncio.gather(*tasks):
        assert r.finish_reason == "abort" and 0 < len(r.token_ids) < MAX_TOKENS
        assert set(r.weight_versions) == {0}
    assert engine.stats()["num_running"] == 0


async def test_recompute_continues_on_new_weights(engine: AsyncEngine, new_dir: Path) -> None:
    gate, tasks = await start(engine)
    await (await gate.land(engine.pause()))
    await engine.update_weights(new_dir, "recompute")
    await engine.resume()
    for r in await asyncio.gather(*tasks):
        assert r.finish_reason == "length" and len(r.token_ids) == MAX_TOKENS
        assert_versions_split(r, 0, 1)


async def test_bad_updates_leave_version_and_outputs_unchanged(engine: AsyncEngine, new_dir: Path,
                                                                tmp_path: Path) -> None:
    sp = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True, logprobs=1)
    before = await collect(engine, PROMPT, sp, CompletionResult("a", PROMPT))
    good = read_safetensors(new_dir)
    missing = dict(good)
    missing.pop("model.norm.weight")
    shape = {**good, "model.norm.weight": torch.ones(3)}
    for bad in (missing, shape, save(missing)):
        with pytest.raises(WeightLoadError):
            await engine.update_weights(bad, "keep")
    with pytest.raises(WeightLoadError):
        await engine.update_weights(b"not safetensors at all")
    with pytest.raises(FileNotFoundError):
        await engine.update_weights(tmp_path / "nope.safetensors")
    assert engine.weight_version == 0
    after = await collect(engine, PROMPT, sp, CompletionResult("b", PROMPT))
    assert (after.token_ids, after.logprobs, after.weight_versions) == (before.token_ids, before.logprobs,
                                                                        before.weight_versions)


async def test_concurrent_updates_are_serialized(engine: AsyncEngine, new_dir: Path) -> None:
    state = read_safetensors(new_dir)
    versions = await asyncio.gather(*(engine.update_weights(state) for _ in range(3)))
    assert sorted(versions) == [1, 2, 3] and engine.weight_version == 3


async def test_checksums_follow_the_update(engine: AsyncEngine, new_dir: Path) -> None:
    old = await engine.weight_checksums()
    state = read_safetensors(new_dir)
    await engine.update_weights(new_dir)
    new = await engine.weight_checksums()
    assert new == engine.core.weight_checksums() and new.keys() == old.keys()
    assert all(new[k] != old[k] for k in old)
    t = state["model.norm.weight"].contiguous()
    assert new["model.norm.weight"] == hashlib.sha256(t.view(torch.uint8).numpy().tobytes()).hexdigest()


async def test_pause_keep_loses_nothing_and_queues_new_requests(engine: AsyncEngine) -> None:
    gate, tasks = await start(engine, 4)
    await (await gate.land(engine.pause("keep")))
    await engine.pause("keep")  # idempotent
    assert engine.is_paused()
    late = [asyncio.create_task(collect(engine, PROMPT, params(i, 4), CompletionResult(str(i), PROMPT)))
            for i in range(3)]
    await asyncio.sleep(0.05)
    assert not any(t.done() for t in tasks + late)
    await engine.resume()
    await engine.resume()
    assert not engine.is_paused()
    done = await asyncio.gather(*tasks, *late)
    assert all(r.finish_reason == "length" for r in done)
    assert [len(r.token_ids) for r in done] == [MAX_TOKENS] * 4 + [4] * 3


async def test_pause_wait_lets_in_flight_finish_and_holds_new_ones(engine: AsyncEngine) -> None:
    gate, tasks = await start(engine, 4)
    pausing = await gate.land(engine.pause("wait"))
    late = asyncio.create_task(collect(engine, PROMPT, params(0, 4), CompletionResult("late", PROMPT)))
    await pausing
    assert engine.is_paused()
    done = await asyncio.gather(*tasks)
    assert all(r.finish_reason == "length" and len(r.token_ids) == MAX_TOKENS for r in done)
    await asyncio.sleep(0.05)
    assert not late.done() and engine.stats()["num_running"] == 0
    await engine.pause("wait")  # already paused: returns at once
    await engine.resume()
    assert len((await late).token_ids) == 4


async def test_pause_abort_finishes_in_flight_with_abort(engine: AsyncEngine) -> None:
    gate, tasks = await start(engine, 6)
    await (await gate.land(engine.pause("abort")))
    assert engine.is_paused()
    done = await asyncio.gather(*tasks)
    assert all(r.finish_reason == "abort" and 0 < len(r.token_ids) < MAX_TOKENS for r in done)
    late = asyncio.create_task(collect(engine, PROMPT, params(0, 4), CompletionResult("late", PROMPT)))
    await asyncio.sleep(0.05)
    assert not late.done()
    await engine.resume()
    assert (await late).finish_reason == "length"
    assert engine.stats()["num_free_blocks"] == engine.stats()["num_total_blocks"]


async def test_shutdown_during_pause_wait_fails_held_requests(llama_dir: Path) -> None:
    from asyncengine.async_engine import EngineDeadError

    eng = AsyncEngine.from_config(EngineConfig(model=str(llama_dir), num_kv_blocks=256, num_threads=1))
    # Long enough that the drain is still on when the late request is held (once drained,
    # a request added while paused is queued in the core and ends "abort" at shutdown).
    gate, tasks = await start(eng, 2, max_tokens=400)
    pausing = await gate.land(eng.pause("wait"))
    late = asyncio.create_task(collect(eng, PROMPT, params(0, 400), CompletionResult("late", PROMPT)))
    await until(lambda: eng.stats()["num_paused_requests"] == 1, "holding the late request")
    assert not pausing.done()  # still draining
    eng.shutdown()
    await asyncio.gather(*tasks, pausing, return_exceptions=True)
    with pytest.raises(EngineDeadError):
        await asyncio.wait_for(late, 10)
