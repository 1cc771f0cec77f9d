"""Sessions over HTTP (aiohttp test client, tiny random Llama): turns, episode, errors."""
from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp.test_utils import TestClient

from api.client import AsyncClient, BadRequestError, NotFoundError
from asyncengine.async_engine import AsyncEngine
from tests.test_server import MODEL, client, make_engine  # noqa: F401  (client: the app fixture)

BS = 16
START = [{"role": "system", "content": "The quick brown fox jumps over the lazy dog."},
         {"role": "user", "content": "Hello world!"}]


@pytest.fixture(scope="module")
def engine(llama_dir: Path):
    eng = make_engine(llama_dir, num_kv_blocks=64, block_size=BS)
    yield eng
    eng.shutdown()


async def chat(client: TestClient, body: dict[str, Any], headers: dict[str, str] | None = None) -> tuple[int, Any]:
    resp = await client.post("/v1/chat/completions", data=orjson.dumps({"model": MODEL, **body}),
                             headers={"Content-Type": "application/json", **(headers or {})})
    return resp.status, orjson.loads(await resp.read())


async def stream_turn(client: TestClient, body: dict[str, Any], headers: dict[str, str]) -> dict[str, Any]:
    resp = await client.post("/v1/chat/completions", json={"model": MODEL, "stream": True, **body}, headers=headers)
    assert resp.status == 200
    events = [orjson.loads(e[6:]) for e in (await resp.read()).decode().split("\n\n") if e and e != "data: [DONE]"]
    text = "".join(c["delta"].get("content", "") for ev in events for c in ev["choices"])
    ids = [t for ev in events for c in ev["choices"] for t in c.get("token_ids", [])]
    return {"text": text, "token_ids": ids, "session": events[0]["session"], "usage": events[-1]["usage"]}


async def pins(engine: AsyncEngine) -> tuple[int, int, int]:
    return await engine.call(lambda core: (core.pool.num_free_blocks, core.pool.num_blocks,
                                           sum(b.pins for b in core.pool.blocks)))


async def test_turns_by_body_and_header_build_the_episode(client: TestClient, engine: AsyncEngine) -> None:
    status, r1 = await chat(client, {"messages": START, "max_tokens": 5, "seed": 0, "session_id": "h1",
                                     "return_token_ids": True, "logprobs": True})
    assert status == 200 and r1["session"] == {"id": "h1", "turn": 0, "drift": r1["session"]["drift"]}
    msgs = [*START, r1["choices"][0]["message"], {"role": "tool", "content": "result: 42"}]
    r2 = await stream_turn(client, {"messages": msgs, "max_tokens": 4, "seed": 1, "return_token_ids": True,
                                    "stream_options": {"include_usage": True}}, {"X-Session-ID": "h1"})
    assert r2["session"]["turn"] == 1 and len(r2["token_ids"]) == 4
    resp = await client.get("/v1/sessions/h1")
    ep = orjson.loads(await resp.read())
    assert resp.status == 200 and ep["num_turns"] == 2
    t0, t1 = ep["turns"]
    assert ep["token_ids"][: t0["completion_start"]] == r1["prompt_token_ids"]
    assert ep["token_ids"][t0["completion_start"]: t0["end"]] == r1["choices"][0]["token_ids"]
    assert ep["token_ids"][t1["completion_start"]: t1["end"]] == r2["token_ids"] and t1["end"] == len(ep["token_ids"])
    assert ep["loss_mask"] == [int(t0["completion_start"] <= i < t0["end"] or i >= t1["completion_start"])
                               for i in range(len(ep["token_ids"]))]
    sampled_lps = [x for x, m in zip(ep["logprobs"], ep["loss_mask"]) if m][:5]
    assert sampled_lps == [e["logprob"] for e in r1["choices"][0]["logprobs"]["content"]]
    # Turn 2's prompt found every earlier token but the last partial block in the cache.
    assert r2["usage"]["prompt_tokens"] == t1["completion_start"]
    assert r2["usage"]["prompt_tokens_details"]["cached_tokens"] == t1["cached_tokens"] == (t0["end"] - 1) // BS * BS
    resp = await client.delete("/v1/sessions/h1")
    assert resp.status == 200 and orjson.loads(await resp.read())["deleted"] is True
    assert (await client.get("/v1/sessions/h1")).status == 404
    free, total, pinned = await pins(engine)
    assert free == total and pinned == 0


async def test_session_errors(client: TestClient, engine: AsyncEngine) -> None:
    assert (await client.get("/v1/sessions/nope")).status == 404
    assert (await client.delete("/v1/sessions/nope")).status == 404
    assert (await client.get("/v1/sessions/bad%20id")).status == 400
    later = [*START, {"role": "assistant", "content": "hi"}, {"role": "user", "content": "and?"}]
    status, body = await chat(client, {"messages": later, "session_id": "ghost"})
    assert status == 404 and body["error"]["code"] == "session_not_found"
    status, body = await chat(client, {"messages": START, "session_id": "e", "n": 2})
    assert status == 400 and body["error"]["param"] == "n"
    status, body = await chat(client, {"messages": START, "session_id": 7})
    assert status == 400
    status, r1 = await chat(client, {"messages": START, "session_id": "e", "max_tokens": 3, "seed": 0})
    assert status == 200
    nxt = [*START, r1["choices"][0]["message"], {"role": "user", "content": "again"}]
    status, body = await chat(client, {"messages": [*START, {"role": "user", "content": "x"}], "session_id": "e"})
    assert status == 400 and body["error"]["code"] == "session_history_mismatch"
    status, body = await chat(client, {"messages": nxt, "session_id": "e", "max_tokens": 400})
    assert status == 400 and "maximum context length" in body["error"]["message"]
    # A turn in progress: a second turn and a DELETE are 409; the first one still completes.
    first = asyncio.ensure_future(chat(client, {"messages": nxt, "session_id": "e", "max_tokens": 150,
                                                "ignore_eos": True}))
    for _ in range(200):
        if engine.stats()["num_running"]:
            break
        await asyncio.sleep(0.005)
    status, body = await chat(client, {"messages": nxt, "session_id": "e"})
    assert status == 409 and body["error"]["code"] == "session_busy"
    assert (await client.delete("/v1/sessions/e")).status == 409
    status, r2 = await first
    assert status == 200 and r2["session"]["turn"] == 1
    assert (await client.delete("/v1/sessions/e")).status == 200
    free, total, pinned = await pins(engine)
    assert free == total and pinned == 0


async def test_sdk_session_methods(client: TestClient) -> None:
    async with AsyncClient(str(client.make_url("")), model=MODEL) as sdk:
        r1 = await sdk.chat(START, max_tokens=3, seed=0, session_id="sdk")
        assert r1.session is not None and r1.session["turn"] == 0
        ep = await sdk.get_session("sdk")
        assert ep["token_ids"][-3:] == r1.token_ids
        deltas = [d async for d in sdk.stream_chat([*START, {"role": "assistant", "content": r1.text},
                                                     {"role": "user", "content": "more"}],
                                                    max_tokens=2, seed=1, session_id="sdk")]
        assert sum(len(d.token_ids) for d in deltas) == 2
        assert (await sdk.get_session("sdk"))["num_turns"] == 2
        assert (await sdk.delete_session("sdk"))["deleted"] is True
        with pytest.raises(NotFoundError):
            await sdk.get_session("sdk")
        with pytest.raises(BadRequestError):
            await sdk.get_session("no spaces")
