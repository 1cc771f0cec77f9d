"""Faults inside the engine seen over HTTP: the affected request gets an SSE error event
or a 500 JSON body with a type and code; a concurrent request's output is bitwise the
same as without the fault; a fatal error turns /health into a 503 with the reason."""
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp.test_utils import TestClient, TestServer

from api.server import create_app
from asyncengine.async_engine import AsyncEngine
from asyncengine.config import EngineConfig
from asyncengine.reliability.faults import FaultHook
from tests.test_server import MODEL, post, wait_idle

C = "/v1/completions"
# Greedy, with logprobs, long enough to overlap the faulty request.
OK = {"prompt": "The quick brown fox", "max_tokens": 24, "temperature": 0, "ignore_eos": True, "logprobs": 2,
      "return_token_ids": True}


def _engine(model_dir: Path, hook: FaultHook, **kw: Any) -> AsyncEngine:
    config = EngineConfig(model=str(model_dir), num_kv_blocks=128, max_model_len=256, num_threads=1, **kw)
    return AsyncEngine.from_config(config, faults=hook)


@pytest.fixture(scope="module")
def hook() -> FaultHook:
    return FaultHook(tokenize_raises_on="POISON")


@pytest.fixture(scope="module")
def engine(llama_dir: Path, hook: FaultHook):
    eng = _engine(llama_dir, hook)
    yield eng
    eng.shutdown()


@pytest.fixture
async def client(engine: AsyncEngine, hook: FaultHook) -> AsyncIterator[TestClient]:
    async with TestClient(TestServer(create_app(engine, [MODEL]))) as c:
        yield c
    hook.nan_logits_for = hook.forward_raises_for = hook.detokenize_raises_for = ()


async def _sse(client: TestClient, body: dict[str, Any]) -> list[Any]:
    resp = await client.post(C, json={**body, "stream": True})
    assert resp.status == 200
    events = [e for e in (await resp.read()).decode().split("\n\n") if e]
    assert events[-1] == "data: [DONE]"
    return [orjson.loads(e[6:]) for e in events[:-1]]


def _error(body: Any, code: str) -> None:
    err = body["error"]
    assert (err["type"], err["code"]) == ("server_error", code) and err["message"], body


@pytest.mark.parametrize(("field", "code"), [("nan_logits_for", "nonfinite_logits"),
                                             ("forward_raises_for", "forward_error"),
                                             ("detokenize_raises_for", "detokenizer_error")])
async def test_faulty_request_errors_others_unchanged(client: TestClient, engine: AsyncEngine, hook: FaultHook,
                                                      field: str, code: str) -> None:
    status, want = await post(client, C, OK)
    assert status == 200
    setattr(hook, field, ("victim",))
    hook.clean_calls = 3  # the stream sends some tokens, then fails
    victim = {**OK, "prompt": "Hello world", "request_id": "victim", "max_tokens": 30}
    (ok_status, got), events, (bad_status, bad_body) = await asyncio.gather(
        post(client, C, OK), _sse(client, victim), post(client, C, {**victim, "request_id": "victim2"}))
    assert ok_status == 200 and got["choices"] == want["choices"]  # text, token ids, logprobs: bit for bit
    assert sum(len(e["choices"][0]["token_ids"]) for e in events[:-1]) >= 2
    _error(events[-1], code)  # the stream ends with an error event, then [DONE]
    assert bad_status == 500
    _error(bad_body, code)
    hook.clean_calls = 0  # a stream failing before its first token: headers not sent yet, a 500 JSON body
    early_status, early = await post(client, C, {**victim, "request_id": "victim3", "stream": True})
    assert early_status == 500
    _error(early, code)
    s = await wait_idle(engine)
    assert engine.is_healthy and s["num_free_blocks"] == s["num_total_blocks"]


async def test_tokenizer_error_fails_that_request_only(client: TestClient) -> None:
    _, want = await post(client, C, OK)
    (bad_status, bad), (ok_status, got) = await asyncio.gather(
        post(client, C, {**OK, "prompt": "a POISON prompt"}), post(client, C, OK))
    assert bad_status == 500
    _error(bad, "tokenizer_error")
    assert ok_status == 200 and got["choices"] == want["choices"]


async def test_queue_timeout_is_503(llama_dir: Path) -> None:
    eng = _engine(llama_dir, FaultHook(), max_queue_seconds=0.2)
    try:
        async with TestClient(TestServer(create_app(eng, [MODEL]))) as client:
            await eng.pause()
            for stream in (False, True):
                resp = await client.post(C, json={**OK, "stream": stream})
                assert resp.status == 503 and resp.headers["Retry-After"] == "1"
                _error(orjson.loads(await resp.read()), "queue_timeout")
            await eng.resume()
            assert (await post(client, C, OK))[0] == 200
            text = (await (await client.get("/metrics")).read()).decode()
            assert 'asyncengine_requests_rejected_total{reason="queue_timeout"} 2.0' in text
    finally:
        eng.shutdown()


async def test_fatal_error_health_503_with_reason(llama_dir: Path) -> None:
    hook = FaultHook()
    eng = _engine(llama_dir, hook)
    try:
        async with TestClient(TestServer(create_app(eng, [MODEL]))) as client:
            hook.fatal_at_step = eng.core.num_steps + 4
            events = await asyncio.wait_for(_sse(client, {**OK, "max_tokens": 100}), 30)
            _error(events[-1], "engine_dead")
            resp = await client.get("/health")
            body = orjson.loads(await resp.read())
            assert resp.status == 503 and "injected fatal engine error" in body["error"]["message"]
            status, body = await asyncio.wait_for(post(client, C, OK), 10)
            assert status == 500 and body["error"]["code"] == "engine_dead"
            text = (await (await client.get("/metrics")).read()).decode()
            assert "asyncengine_healthy 0.0" in text
    finally:
        eng.shutdown()


def _samples(text: str) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
            out[s.name + (f"{{{labels}}}" if labels else "")] = s.value
    return out


async def test_reliability_metrics_values(llama_dir: Path) -> None:
    from asyncengine.sampling_params import InvalidRequestError, SamplingParams

    eng = _engine(llama_dir, FaultHook(nan_logits_for=("victim",)), max_waiting=2)
    try:
        async with TestClient(TestServer(create_app(eng, [MODEL]))) as client:
            async def scrape() -> dict[str, float]:
                return _samples((await (await client.get("/metrics")).read()).decode())

            m = await scrape()
            assert (m["asyncengine_kv_cache_total_blocks"], m["asyncengine_kv_cache_cached_blocks"]) == (128, 0)
            assert "asyncengine_num_open_sessions" not in m  # no sessions module reports any
            assert (await post(client, C, {"prompt": list(range(3, 51)), "max_tokens": 1}))[0] == 200
            assert (await post(client, C, {"prompt": "hi", "max_tokens": 5, "request_id": "victim"}))[0] == 500
            with pytest.raises(InvalidRequestError):
                await eng.add_request([], SamplingParams(max_tokens=1))
            await eng.pause()
            held = [asyncio.create_task(post(client, C, {"prompt": "hi", "max_tokens": 5})) for _ in range(2)]
            while eng.stats()["num_waiting"] < 2:
                await asyncio.sleep(0.01)
            assert (await post(client, C, {"prompt": "hi", "max_tokens": 5}))[0] == 503  # the queue is full
            m = await scrape()
            assert m["asyncengine_num_requests_paused"] == 2
            await eng.pause("abort")
            assert [r[1]["choices"][0]["finish_reason"] for r in await asyncio.gather(*held)] == ["abort"] * 2
            await eng.resume()
            m = await scrape()
        # 48 prompt tokens = 3 full blocks of 16 cached; the victim's prompt fills none.
        assert m["asyncengine_kv_cache_cached_blocks"] == 3
        assert m["asyncengine_num_requests_paused"] == 0
        assert m["asyncengine_requests_failed_total"] == 1
        assert m["asyncengine_requests_aborted_total"] == 2
        assert m["asyncengine_requests_rejected_total{reason=overloaded}"] == 1
        assert m["asyncengine_requests_rejected_total{reason=invalid}"] == 1
        assert m["asyncengine_requests_rejected_total{reason=queue_timeout}"] == 0
    finally:
        eng.shutdown()
