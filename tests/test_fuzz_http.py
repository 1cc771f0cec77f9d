"""Fuzz every HTTP endpoint (the route table in tests/fuzz_routes.py) with Hypothesis.

For each drawn request: no 5xx, an OpenAI-style JSON error body for every 4xx, a
well-formed SSE stream ending in [DONE] for every streamed 200. After each route's
examples: the engine is healthy, nothing runs, every KV block is free.
Derandomized (fixed seeds), so a failure reproduces.
"""
from __future__ import annotations

import asyncio
import json
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp.test_utils import TestClient, TestServer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from api.admin import add_admin_routes
from api.server import create_app
from asyncengine.async_engine import AsyncEngine
from tests.fuzz_routes import ADMIN_KEY, MODEL, ROUTES, Route
from tests.test_server import make_engine, wait_idle


class _Harness:
    """A server on its own event loop, so sync Hypothesis tests can drive it."""

    def __init__(self, engine: AsyncEngine, weights_dir: Path) -> None:
        self.engine = engine
        self.loop = asyncio.new_event_loop()
        app = create_app(engine, [MODEL])
        add_admin_routes(app, engine, ADMIN_KEY, weights_dir)

        async def start() -> TestClient:  # aiohttp objects bind to the running loop
            client = TestClient(TestServer(app))
            await client.start_server()
            return client

        self.client = self.loop.run_until_complete(start())

    def run(self, coro: Any) -> Any:
        return self.loop.run_until_complete(asyncio.wait_for(coro, 60))

    def close(self) -> None:
        self.loop.run_until_complete(self.client.close())
        self.loop.close()


@pytest.fixture(scope="module")
def harness(llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[_Harness]:
    engine = make_engine(llama_dir, num_kv_blocks=64, max_model_len=128)
    h = _Harness(engine, tmp_path_factory.mktemp("weights"))
    yield h
    h.close()
    engine.shutdown()


def _check_error_body(status: int, raw: bytes) -> None:
    body = orjson.loads(raw)
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"} and isinstance(err["message"], str), body
    assert err["type"].endswith("_error"), body


def _check_sse(raw: bytes) -> None:
    events = [e for e in raw.decode().split("\n\n") if e]
    assert events and events[-1] == "data: [DONE]", raw[-200:]
    for e in events[:-1]:
        assert e.startswith("data: ")
        chunk = orjson.loads(e[6:])
        assert "error" not in chunk, chunk  # no 5xx-as-event for bad input either


async def _send(h: _Harness, route: Route, body: Any, query: str, key: str, seen: Counter[int]) -> None:
    headers = {"Content-Type": route.content_type, **route.headers}
    if route.admin:
        headers["Authorization"] = f"Bearer {key}"
    data = None if route.body is None else body if isinstance(body, bytes) else json.dumps(body).encode()  # big ints, Infinity
    resp = await h.client.request(route.method, route.path + query, data=data, headers=headers)
    raw = await resp.read()
    seen[resp.status] += 1
    assert resp.status < 500, (route.path, body, raw[:300])
    if resp.status >= 400:
        _check_error_body(resp.status, raw)
    elif resp.headers.get("Content-Type", "").startswith("text/event-stream"):
        _check_sse(raw)
    if route.undo is not None:
        undo = await h.client.request(route.undo[0], route.undo[1], headers={"Authorization": f"Bearer {ADMIN_KEY}"})
        # A session that the example did not open is already gone.
        assert undo.status == 200 or (route.undo[0] == "DELETE" and undo.status == 404), await undo.read()


@pytest.mark.parametrize("route", ROUTES, ids=[f"{r.method} {r.path} {r.content_type}" for r in ROUTES])
def test_fuzz_route(harness: _Harness, route: Route) -> None:
    generation = route.path.startswith(("/v1/", "/inference/")) and route.method == "POST"
    examples = 60 if generation else 20
    seen: Counter[int] = Counter()

    @settings(max_examples=examples, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(body=route.body if route.body is not None else st.none(), query=route.query,
           key=st.sampled_from([ADMIN_KEY] * 5 + ["wrong"]))
    def fuzz(body: Any, query: str, key: str) -> None:
        harness.run(_send(harness, route, body, query, key, seen))

    fuzz()
    if route.body is not None:  # the draws fail validation, and (but for weights) reach past it
        assert sum(n for code, n in seen.items() if 400 <= code < 500), seen
        assert seen[200] or route.path == "/update_weights", seen
    s = harness.run(wait_idle(harness.engine))
    assert harness.engine.is_healthy and not harness.engine.is_paused()
    assert s["num_free_blocks"] == s["num_total_blocks"]
