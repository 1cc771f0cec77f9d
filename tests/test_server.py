"""The HTTP server through aiohttp's test client, on a tiny random Llama."""
from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import orjson
import pytest
import torch
from aiohttp.test_utils import TestClient, TestServer

from api.server import create_app
from asyncengine.async_engine import AsyncEngine
from asyncengine.config import EngineConfig
from asyncengine.sampling_params import SamplingParams
from tests.tiny_models import load_hf

MODEL = "tiny"
TEXT = "The quick brown fox jumps over the lazy dog. Reinforcement learning trains a policy."


def make_engine(model_dir: Path, **kw: Any) -> AsyncEngine:
    base: dict[str, Any] = dict(model=str(model_dir), num_kv_blocks=256, max_model_len=256, num_threads=1)
    base.update(kw)
    return AsyncEngine.from_config(EngineConfig(**base))


@pytest.fixture(scope="module")
def engine(llama_dir: Path):
    eng = make_engine(llama_dir)
    yield eng
    eng.shutdown()


@pytest.fixture
async def client(engine: AsyncEngine):
    async with TestClient(TestServer(create_app(engine, [MODEL]))) as c:
        yield c


async def post(client: TestClient, path: str, body: Any) -> tuple[int, Any]:
    data = body if isinstance(body, bytes) else orjson.dumps(body)
    resp = await client.post(path, data=data, headers={"Content-Type": "application/json"})
    return resp.status, orjson.loads(await resp.read())


async def stream_events(client: TestClient, path: str, body: dict[str, Any]) -> list[Any]:
    resp = await client.post(path, json={**body, "stream": True})
    assert resp.status == 200 and resp.headers["Content-Type"].startswith("text/event-stream")
    raw = (await resp.read()).decode()
    events = [e for e in raw.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    return [orjson.loads(e[6:]) for e in events[:-1]]


def concat_stream(events: list[Any], chat: bool) -> dict[int, dict[str, Any]]:
    """Per choice: text, token ids, logprobs and top logprobs concatenated over chunks."""
    out: dict[int, dict[str, Any]] = {}
    for ev in events:
        for c in ev["choices"]:
            acc = out.setdefault(c["index"], {"text": "", "token_ids": [], "lps": [], "tops": [], "finish": None})
            acc["text"] += c["delta"].get("content", "") if chat else c["text"]
            acc["token_ids"] += c.get("token_ids", [])
            if c["logprobs"] is not None:
                entries = c["logprobs"]["content"] if chat else c["logprobs"]["token_logprobs"]
                acc["lps"] += [e["logprob"] for e in entries] if chat else entries
                acc["tops"] += entries if chat else c["logprobs"]["top_logprobs"]
            acc["finish"] = c["finish_reason"] or acc["finish"]
    return out


def full_choices(body: dict[str, Any], chat: bool) -> dict[int, dict[str, Any]]:
    out = {}
    for c in body["choices"]:
        lp = c["logprobs"]
        entries = (lp["content"] if chat else lp["token_logprobs"]) if lp else []
        out[c["index"]] = {
            "text": c["message"]["content"] if chat else c["text"], "token_ids": c.get("token_ids", []),
            "lps": [e["logprob"] for e in entries] if chat else entries,
            "tops": (lp["content"] if chat else lp["top_logprobs"]) if lp else [], "finish": c["finish_reason"],
        }
    return out


async def wait_idle(engine: AsyncEngine) -> dict[str, float]:
    for _ in range(500):
        s = engine.stats()
        if s["num_running"] == 0 and s["num_waiting"] == 0 and s["num_free_blocks"] == s["num_total_blocks"]:
            return s
        await asyncio.sleep(0.01)
    raise AssertionError(f"blocks not freed: {engine.stats()}")


async def test_completion_shape_and_usage(client: TestClient) -> None:
    status, body = await post(client, "/v1/completions", {"model": MODEL, "prompt": TEXT, "max_tokens": 6,
                                                          "seed": 0, "return_token_ids": True})
    assert status == 200 and body["object"] == "text_completion" and body["model"] == MODEL
    (choice,) = body["choices"]
    assert len(choice["token_ids"]) == 6 and choice["finish_reason"] == "length"
    assert choice["weight_versions"] == [0] * 6 and choice["logprobs"] is None
    u = body["usage"]
    assert u["completion_tokens"] == 6 and u["total_tokens"] == u["prompt_tokens"] + 6
    assert choice["prompt_token_ids"] == (await post(client, "/tokenize", {"prompt": TEXT}))[1]["tokens"]


@pytest.mark.parametrize("chat", [False, True])
async def test_stream_equals_non_stream(client: TestClient, chat: bool) -> None:
    body: dict[str, Any] = {"max_tokens": 12, "temperature": 0.9, "seed": 7, "n": 2, "return_token_ids": True}
    if chat:
        path, body = "/v1/chat/completions", {**body, "messages": [{"role": "user", "content": TEXT}],
                                              "logprobs": True, "top_logprobs": 3}
    else:
        path, body = "/v1/completions", {**body, "prompt": TEXT, "logprobs": 3}
    status, full = await post(client, path, body)
    assert status == 200
    events = await stream_events(client, path, {**body, "stream_options": {"include_usage": True}})
    usage = events[-1]["usage"]  # the same, but for prefix-cache hits of the second run
    assert events[-1]["choices"] == [] and usage["total_tokens"] == full["usage"]["total_tokens"]
    streamed, want = concat_stream(events, chat), full_choices(full, chat)
    assert streamed == want and len(want) == 2 and want[0]["token_ids"] != want[1]["token_ids"]
    assert len(events) > 4  # really incremental: one chunk per step per choice


async def test_http_tokens_equal_in_process_engine(client: TestClient, engine: AsyncEngine) -> None:
    sp = SamplingParams(max_tokens=10, temperature=1.0, top_k=20, seed=3, logprobs=0)
    ids, lps = [], []
    async for out in engine.generate(TEXT, sp):
        ids += out.token_ids
        lps += out.logprobs
    _, body = await post(client, "/v1/completions", {"prompt": TEXT, "max_tokens": 10, "top_k": 20, "seed": 3,
                                                     "logprobs": 0, "return_token_ids": True})
    assert body["choices"][0]["token_ids"] == ids
    assert body["choices"][0]["logprobs"]["token_logprobs"] == lps


@pytest.mark.parametrize("max_tokens", [0, 1])
async def test_echo_prompt_logprobs_equal_hf(client: TestClient, llama_dir: Path, max_tokens: int) -> None:
    """lm-eval's loglikelihood request: echo + logprobs, no (or one) generated token."""
    _, tok = await post(client, "/tokenize", {"prompt": TEXT})
    ids = tok["tokens"]
    status, body = await post(client, "/v1/completions", {"prompt": ids, "max_tokens": max_tokens, "echo": True,
                                                          "logprobs": 1, "temperature": 0})
    assert status == 200
    lp = body["choices"][0]["logprobs"]
    assert len(lp["token_logprobs"]) == len(ids) + max_tokens
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    with torch.no_grad():
        ref = load_hf(llama_dir)(torch.tensor([ids])).logits[0].float().log_softmax(-1)
    want = ref[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]
    got = torch.tensor(lp["token_logprobs"][1 : len(ids)], dtype=torch.float32)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert body["choices"][0]["text"].startswith(TEXT)
    for entry, x in zip(lp["top_logprobs"][1:], lp["token_logprobs"][1:]):
        assert x in entry.values() and len(entry) <= 2  # top-1 plus the actual token


async def test_n_uses_seed_plus_index(client: TestClient) -> None:
    base = {"prompt": TEXT, "max_tokens": 8, "return_token_ids": True}
    _, both = await post(client, "/v1/completions", {**base, "n": 3, "seed": 5})
    for i in range(3):
        _, one = await post(client, "/v1/completions", {**base, "seed": 5 + i})
        assert both["choices"][i]["token_ids"] == one["choices"][0]["token_ids"]


async def test_stop_string_and_stop_token(client: TestClient) -> None:
    base = {"prompt": TEXT, "max_tokens": 24, "temperature": 0, "return_token_ids": True, "ignore_eos": True}
    _, ref = await post(client, "/v1/completions", base)
    text, ids = ref["choices"][0]["text"], ref["choices"][0]["token_ids"]
    stop = text[6:9]
    _, body = await post(client, "/v1/completions", {**base, "stop": [stop]})
    c = body["choices"][0]
    assert (c["finish_reason"], c["stop_reason"], c["text"]) == ("stop", stop, text[: text.find(stop)])
    _, body = await post(client, "/v1/completions", {**base, "stop_token_ids": [ids[4]]})
    c = body["choices"][0]
    assert c["finish_reason"] == "stop" and c["stop_reason"] == ids[4]
    assert c["token_ids"] == ids[: ids.index(ids[4]) + 1]


async def test_raw_logprobs_and_kept_mass(client: TestClient) -> None:
    base = {"prompt": TEXT, "max_tokens": 6, "temperature": 0.7, "top_p": 0.9, "seed": 1, "logprobs": 0}
    _, proc = await post(client, "/v1/completions", {**base, "return_raw_logprobs": True,
                                                     "return_log_kept_mass": True})
    _, raw = await post(client, "/v1/completions", {**base, "logprobs_mode": "raw"})
    p, r = proc["choices"][0], raw["choices"][0]
    assert p["text"] == r["text"] and r["logprobs"]["token_logprobs"] == p["raw_logprobs"]
    assert len(p["log_kept_mass"]) == 6 and all(x <= 0 for x in p["log_kept_mass"])


async def test_max_tokens_omitted_runs_to_context_limit(client: TestClient, engine: AsyncEngine) -> None:
    _, body = await post(client, "/v1/completions", {"prompt": [5, 6, 7], "ignore_eos": True})
    assert body["usage"]["completion_tokens"] == engine.model_info.max_model_len - 3
    assert body["choices"][0]["finish_reason"] == "length"


async def test_64_concurrent_streams_equal_each_alone(client: TestClient, engine: AsyncEngine) -> None:
    def body(i: int) -> dict[str, Any]:
        return {"prompt": f"{TEXT[: 10 + i % 40]} {i}", "max_tokens": 12, "seed": i, "temperature": 1.0,
                "logprobs": 1, "return_token_ids": True}

    alone = [full_choices((await post(client, "/v1/completions", body(i)))[1], False) for i in range(64)]
    together = await asyncio.gather(*(stream_events(client, "/v1/completions", body(i)) for i in range(64)))
    assert [concat_stream(ev, False) for ev in together] == alone
    await wait_idle(engine)


async def test_disconnect_mid_stream_frees_all_blocks(client: TestClient, engine: AsyncEngine) -> None:
    total = engine.stats()["num_total_blocks"]
    body = {"prompt": TEXT, "max_tokens": 200, "ignore_eos": True, "stream": True, "n": 2}
    resps = [await client.post("/v1/completions", json=body) for _ in range(3)]
    for resp in resps:
        await resp.content.readline()  # the stream has started
    assert engine.stats()["num_free_blocks"] < total
    for resp in resps:
        resp.close()  # drop the connection mid-stream
    s = await wait_idle(engine)
    assert s["num_free_blocks"] == total
