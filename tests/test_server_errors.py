"""Bad input, overload and engine failure over HTTP: OpenAI-style errors, never a 500 for bad input."""
from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp.test_utils import TestClient, TestServer

from api.server import create_app
from asyncengine.async_engine import AsyncEngine
from tests.test_server import MODEL, make_engine, post, wait_idle

USER = [{"role": "user", "content": "hi"}]
C, CHAT = "/v1/completions", "/v1/chat/completions"
BAD = "invalid_request_error"

# (path, body, status, error type, param)
MALFORMED: list[tuple[str, Any, int, str, str | None]] = [
    (C, b'{"prompt": "hi",', 400, BAD, None),
    (C, b"[1, 2]", 400, BAD, None),
    (C, b"", 400, BAD, None),
    (C, {}, 400, BAD, "prompt"),
    (C, {"prompt": 5}, 400, BAD, "prompt"),
    (C, {"prompt": []}, 400, BAD, "prompt"),
    (C, {"prompt": ""}, 400, BAD, "prompt"),
    (C, {"prompt": [[]]}, 400, BAD, "prompt"),
    (C, {"prompt": ["a", [1, 2]]}, 400, BAD, "prompt"),
    (C, {"prompt": [1, 100_000]}, 400, BAD, "prompt"),
    (C, {"prompt": [1, -1]}, 400, BAD, "prompt"),
    (C, {"prompt": [1, 2.5]}, 400, BAD, "prompt"),
    (C, {"prompt": "hi", "max_tokens": "5"}, 400, BAD, "max_tokens"),
    (C, {"prompt": "hi", "max_tokens": -1}, 400, BAD, "max_tokens"),
    (C, {"prompt": "hi", "max_tokens": 100_000}, 400, BAD, "max_tokens"),
    (C, {"prompt": list(range(300))}, 400, BAD, "prompt"),
    (C, {"prompt": "hi", "temperature": -1}, 400, BAD, "temperature"),
    (C, {"prompt": "hi", "temperature": True}, 400, BAD, "temperature"),
    (C, {"prompt": "hi", "top_p": 0}, 400, BAD, "top_p"),
    (C, {"prompt": "hi", "top_p": 1.5}, 400, BAD, "top_p"),
    (C, {"prompt": "hi", "top_k": -2}, 400, BAD, "top_k"),
    (C, {"prompt": "hi", "min_p": 2}, 400, BAD, "min_p"),
    (C, {"prompt": "hi", "presence_penalty": 3}, 400, BAD, "presence_penalty"),
    (C, {"prompt": "hi", "repetition_penalty": 0}, 400, BAD, "repetition_penalty"),
    (C, {"prompt": "hi", "min_tokens": 5, "max_tokens": 2}, 400, BAD, "min_tokens"),
    (C, {"prompt": "hi", "n": 0}, 400, BAD, "n"),
    (C, {"prompt": "hi", "n": 10_000}, 400, BAD, "n"),
    (C, {"prompt": "hi", "best_of": 3}, 400, BAD, "best_of"),
    (C, {"prompt": "hi", "logprobs": 21}, 400, BAD, "logprobs"),
    (C, {"prompt": "hi", "logprobs": True}, 400, BAD, "logprobs"),
    (C, {"prompt": "hi", "logprobs_mode": "weird"}, 400, BAD, "logprobs_mode"),
    (C, b'{"prompt": "hi", "seed": 1180591620717411303424}', 400, BAD, "seed"),
    (C, b'{"prompt": "hi", "temperature": 1e400}', 400, BAD, None),
    (C, {"prompt": "hi", "seed": "1"}, 400, BAD, "seed"),
    (C, {"prompt": "hi", "stop": [1]}, 400, BAD, "stop"),
    (C, {"prompt": "hi", "stop": ""}, 400, BAD, "stop"),
    (C, {"prompt": "hi", "stop_token_ids": [100_000]}, 400, BAD, "stop_token_ids"),
    (C, {"prompt": "hi", "stop_token_ids": "2"}, 400, BAD, "stop_token_ids"),
    (C, {"prompt": "hi", "stream_options": {"include_usage": True}}, 400, BAD, "stream_options"),
    (C, {"prompt": "hi", "stream": True, "stream_options": {"nope": True}}, 400, BAD, "stream_options"),
    (C, {"prompt": "hi", "logit_bias": {"1": 5}}, 400, BAD, "logit_bias"),
    (C, {"prompt": "hi", "suffix": "x"}, 400, BAD, "suffix"),
    (C, {"prompt": "hi", "model": "gpt-4"}, 404, BAD, "model"),
    (CHAT, {}, 400, BAD, "messages"),
    (CHAT, {"messages": []}, 400, BAD, "messages"),
    (CHAT, {"messages": "hello"}, 400, BAD, "messages"),
    (CHAT, {"messages": [{"content": "x"}]}, 400, BAD, "messages[0]"),
    (CHAT, {"messages": [{"role": "alien", "content": "x"}]}, 400, BAD, "messages[0].role"),
    (CHAT, {"messages": [{"role": "user", "content": 5}]}, 400, BAD, "messages[0].content"),
    (CHAT, {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400, BAD, "messages[0].content"),
    (CHAT, {"messages": USER, "top_logprobs": 2}, 400, BAD, "top_logprobs"),
    (CHAT, {"messages": USER, "logprobs": True, "top_logprobs": 50}, 400, BAD, "top_logprobs"),
    (CHAT, {"messages": USER, "logprobs": 3}, 400, BAD, "logprobs"),
    (CHAT, {"messages": USER, "tools": [{"type": "function"}]}, 400, BAD, "tools[0].function"),
    (CHAT, {"messages": USER, "response_format": {"type": "xml"}}, 400, BAD, "response_format"),
    (CHAT, {"messages": USER, "model": "nope"}, 404, BAD, "model"),
    ("/tokenize", {}, 400, BAD, "prompt"),
    ("/tokenize", {"prompt": 5}, 400, BAD, "prompt"),
    ("/detokenize", {"tokens": [100_000]}, 400, BAD, "tokens"),
    ("/detokenize", {"tokens": "abc"}, 400, BAD, "tokens"),
    ("/v1/nothing", {}, 404, "not_found_error", None),
]


@pytest.fixture(scope="module")
def engine(llama_dir: Path):
    eng = make_engine(llama_dir)
    yield eng
    eng.shutdown()


@pytest.fixture
async def client(engine: AsyncEngine):
    async with TestClient(TestServer(create_app(engine, [MODEL], max_body_bytes=64 * 1024))) as c:
        yield c


def _check_error(status: int, body: Any, want_status: int, want_type: str, want_param: str | None) -> None:
    assert status == want_status, body
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert (err["type"], err["param"]) == (want_type, want_param)


@pytest.mark.parametrize(("path", "body", "status", "type_", "param"), MALFORMED)
async def test_malformed_request(client: TestClient, path: str, body: Any, status: int, type_: str,
                                 param: str | None) -> None:
    got_status, got = await post(client, path, body)
    _check_error(got_status, got, status, type_, param)


async def test_engine_survives_bad_input(client: TestClient, engine: AsyncEngine) -> None:
    for path, body, *_ in MALFORMED:
        await post(client, path, body)
    s = await wait_idle(engine)
    assert engine.is_healthy and s["num_free_blocks"] == s["num_total_blocks"]
    status, _ = await post(client, C, {"prompt": "hi", "max_tokens": 2})
    assert status == 200


async def test_body_too_large_and_wrong_method(client: TestClient) -> None:
    status, body = await post(client, C, orjson.dumps({"prompt": [5] * 40_000}))
    _check_error(status, body, 413, BAD, None)
    resp = await client.get(C)
    _check_error(resp.status, orjson.loads(await resp.read()), 405, BAD, None)


async def test_no_chat_template_is_422(client: TestClient, engine: AsyncEngine) -> None:
    template, engine.tokenizer.chat_template = engine.tokenizer.chat_template, None
    try:
        status, body = await post(client, CHAT, {"messages": USER})
    finally:
        engine.tokenizer.chat_template = template
    _check_error(status, body, 422, BAD, "messages")


async def test_overload_is_503_with_retry_after(llama_dir: Path) -> None:
    eng = make_engine(llama_dir, max_waiting=2)
    try:
        async with TestClient(TestServer(create_app(eng, [MODEL]))) as client:
            await eng.pause()  # requests queue up without running
            body = {"prompt": "hi", "max_tokens": 2}
            queued = [asyncio.create_task(post(client, C, body)) for _ in range(2)]
            while eng.stats()["num_waiting"] < 2:
                await asyncio.sleep(0.01)
            resp = await client.post(C, json=body)
            _check_error(resp.status, orjson.loads(await resp.read()), 503, "server_error", None)
            assert resp.headers["Retry-After"] == "1"
            await eng.resume()
            assert [s for s, _ in await asyncio.gather(*queued)] == [200, 200]
    finally:
        eng.shutdown()


async def test_engine_failure_fails_requests_and_health(llama_dir: Path) -> None:
    eng = make_engine(llama_dir)
    original, calls = eng.core.step, []

    def failing_step():  # type: ignore[no-untyped-def]
        calls.append(1)
        if len(calls) > 2:
            raise RuntimeError("boom")
        return original()

    eng.core.step = failing_step  # type: ignore[method-assign]
    try:
        async with TestClient(TestServer(create_app(eng, [MODEL]))) as client:
            assert (await client.get("/health")).status == 200
            resp = await client.post(C, json={"prompt": "hi", "max_tokens": 50, "ignore_eos": True, "stream": True})
            events = (await resp.read()).decode().split("\n\n")
            assert "error" in orjson.loads(events[-3][6:]) and events[-2] == "data: [DONE]"
            status, body = await post(client, C, {"prompt": "hi", "max_tokens": 5})
            _check_error(status, body, 500, "server_error", None)
            assert (await client.get("/health")).status == 503
    finally:
        eng.shutdown()


async def test_info_endpoints(client: TestClient, engine: AsyncEngine) -> None:
    models = orjson.loads(await (await client.get("/v1/models")).read())
    assert [m["id"] for m in models["data"]] == [MODEL]
    assert (await client.get("/health")).status == 200
    _, tok = await post(client, "/tokenize", {"prompt": "Hello world"})
    _, detok = await post(client, "/detokenize", {"tokens": tok["tokens"]})
    assert detok["prompt"] == "Hello world" and tok["count"] == len(tok["tokens"])
    _, chat_tok = await post(client, "/tokenize", {"messages": USER})
    assert chat_tok["tokens"][0] == 1  # <|im_start|>
    info = orjson.loads(await (await client.get("/tokenizer_info")).read())
    assert info["eos_token"] == "<|im_end|>" and info["eos_token_id"] == 2
    await wait_idle(engine)
    steps = engine.num_steps  # this app's registry has seen no step yet (the engine was idle)
    _, hi = await post(client, "/tokenize", {"prompt": "hi"})
    status, done = await post(client, C, {"prompt": "hi", "max_tokens": 3, "ignore_eos": True})
    assert status == 200 and done["usage"]["completion_tokens"] == 3
    await post(client, C, {"prompt": "hi", "max_tokens": "x"})  # a 400, counted as such
    await wait_idle(engine)
    await metrics_match(client, engine, hi["count"], engine.num_steps - steps)


async def metrics_match(client: TestClient, engine: AsyncEngine, prompt_tokens: int, steps: int) -> None:
    """The values of this app's /metrics (a fresh registry per app) after one 3-token
    completion of `prompt_tokens` prompt tokens and one 400 that took `steps` engine
    steps, on an idle engine."""
    from prometheus_client.parser import text_string_to_metric_families

    text = (await (await client.get("/metrics")).read()).decode()
    got = {(s.name, tuple(sorted(s.labels.items()))): s.value
           for fam in text_string_to_metric_families(text) for s in fam.samples}

    def one(name: str, **labels: str) -> float:
        return got[(f"asyncengine_{name}", tuple(sorted(labels.items())))]

    stats = engine.stats()
    assert one("requests_total", endpoint=C, status="200") == 1
    assert one("requests_total", endpoint=C, status="400") == 1
    assert one("generation_tokens_total") == 3 and one("prompt_tokens_total") == prompt_tokens
    assert one("time_to_first_token_seconds_count") == 1 and one("e2e_request_latency_seconds_count") == 1
    assert one("step_seconds_count") == steps > 0
    assert one("num_requests_running") == 0 and one("num_requests_waiting") == 0
    assert one("kv_cache_usage_ratio") == stats["kv_usage"] and one("kv_cache_free_blocks") == stats["num_free_blocks"]
    query, hit = stats["prefix_query_tokens"], stats["prefix_hit_tokens"]
    assert one("prefix_cache_hit_rate") == (hit / query if query else 0.0) and 0 <= hit <= query
    assert one("weight_version") == engine.weight_version and one("healthy") == 1
