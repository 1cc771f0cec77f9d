"""The async SDK (api.client) against the aiohttp test server on a tiny random Llama."""
from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from aiohttp.test_utils import TestServer

from api.client import AsyncClient, BadRequestError, Delta, NotFoundError, OverloadedError
from api.server import create_app
from asyncengine.async_engine import AsyncEngine
from asyncengine.sampling_params import SamplingParams
from tests.test_server import MODEL, TEXT, make_engine, wait_idle

USER = [{"role": "user", "content": "Hello world!"}]


@pytest.fixture(scope="module")
def engine(llama_dir: Path):
    eng = make_engine(llama_dir)
    yield eng
    eng.shutdown()


@pytest.fixture
async def client(engine: AsyncEngine):
    server = TestServer(create_app(engine, [MODEL]))
    await server.start_server()
    async with AsyncClient(str(server.make_url("")), model=MODEL) as c:
        yield c
    await server.close()


def _concat(deltas: list[Delta]) -> tuple[str, list[int], list[float], list[int]]:
    return (
        "".join(d.text for d in deltas), [t for d in deltas for t in d.token_ids],
        [x for d in deltas for x in d.logprobs], [v for d in deltas for v in d.weight_versions],
    )


async def test_complete_returns_ids_logprobs_versions(client: AsyncClient, engine: AsyncEngine) -> None:
    res = await client.complete(TEXT, max_tokens=8, seed=2, temperature=0.8)
    ids, lps = [], []
    async for out in engine.generate(TEXT, SamplingParams(max_tokens=8, seed=2, temperature=0.8)):
        ids += out.token_ids
        lps += out.logprobs
    assert (res.token_ids, res.logprobs) == (ids, lps)
    assert res.choices[0].weight_versions == [0] * 8 and res.usage["completion_tokens"] == 8
    assert res.choices[0].prompt_token_ids == await client.tokenize(TEXT)


@pytest.mark.parametrize("chat", [False, True])
async def test_stream_concatenates_to_full(client: AsyncClient, chat: bool) -> None:
    kw = dict(max_tokens=10, seed=4, temperature=1.0)
    if chat:
        full = await client.chat(USER, **kw)
        deltas = [d async for d in client.stream_chat(USER, **kw)]
    else:
        full = await client.complete(TEXT, **kw)
        deltas = [d async for d in client.stream_complete(TEXT, **kw)]
    c = full.choices[0]
    assert _concat(deltas) == (c.text, c.token_ids, c.logprobs, c.weight_versions)
    assert deltas[-1].finish_reason == c.finish_reason == "length" and len(deltas) > 1


async def test_echo_scoring_splits_prompt_logprobs(client: AsyncClient) -> None:
    ids = await client.tokenize(TEXT)
    res = await client.complete(ids, max_tokens=0, echo=True, logprobs=1)
    c = res.choices[0]
    assert c.token_ids == [] and c.logprobs == []
    assert c.prompt_logprobs is not None and len(c.prompt_logprobs) == len(ids) and c.prompt_logprobs[0] is None


async def test_batch_and_n(client: AsyncClient) -> None:
    res = await client.complete([TEXT, "Hello"], n=2, max_tokens=3, seed=0)
    assert [c.index for c in res.choices] == [0, 1, 2, 3] and all(len(c.token_ids) == 3 for c in res.choices)


async def test_tokenize_roundtrip_and_models(client: AsyncClient) -> None:
    ids = await client.tokenize("Hello world")
    assert await client.detokenize(ids) == "Hello world"
    assert await client.models() == [MODEL] and await client.health()


async def test_typed_errors(client: AsyncClient) -> None:
    with pytest.raises(BadRequestError) as e:
        await client.complete(TEXT, temperature=-1)
    assert e.value.status == 400 and e.value.param == "temperature"
    with pytest.raises(BadRequestError):
        async for _ in client.stream_complete(TEXT, max_tokens=10**6):
            pass
    with pytest.raises(NotFoundError):
        await client.chat(USER, model="nope")


async def test_leaving_a_stream_aborts_the_request(client: AsyncClient, engine: AsyncEngine) -> None:
    stream = client.stream_complete(TEXT, max_tokens=200, ignore_eos=True)
    async for _ in stream:
        break
    await stream.aclose()  # closes the connection; the server aborts the request
    s = await wait_idle(engine)
    assert s["num_free_blocks"] == s["num_total_blocks"]


async def test_overloaded_error_has_retry_after(llama_dir: Path) -> None:
    eng = make_engine(llama_dir, max_waiting=1)
    server = TestServer(create_app(eng, [MODEL]))
    await server.start_server()
    try:
        async with AsyncClient(str(server.make_url(""))) as client:
            await eng.pause()
            queued = asyncio.create_task(client.complete(TEXT, max_tokens=2))
            while eng.stats()["num_waiting"] < 1:
                await asyncio.sleep(0.01)
            with pytest.raises(OverloadedError) as e:
                await client.complete(TEXT, max_tokens=2)
            assert e.value.retry_after == 1.0
            await eng.resume()
            assert len((await queued).token_ids) == 2
    finally:
        await server.close()
        eng.shutdown()
