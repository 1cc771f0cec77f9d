"""Invariance across the ways of asking: offline EngineCore solo vs the in-process
AsyncEngine stream vs HTTP streaming vs HTTP non-streaming, all at once on one engine.

Every request of a concurrent mix must give its solo run's token ids, logprobs, top-N
values and finish reason bitwise (JSON floats round-trip exactly; -inf is sent as
NEG_INF_LOGPROB, as the server documents).
"""
from __future__ import annotations

import asyncio
import math
import random
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestServer

from api.client import AsyncClient
from api.responses import TokenStrings, lp
from api.server import create_app
from asyncengine.async_engine import AsyncEngine
from asyncengine.config import EngineConfig
from tests.invariance_harness import MODES, Outcome, Req, make_engine, random_prompt, run

VOCAB = 384
WAYS = ("in-process stream", "http stream", "http full")



def _http_view(o: Outcome, tokens: TokenStrings) -> tuple[Any, ...]:
    """What the completions API returns for an outcome: top-N as {token string: logprob}
    with the chosen token always present, -inf as NEG_INF_LOGPROB. lp() would also turn a
    NaN into NEG_INF_LOGPROB on both sides, so the reference must hold none."""
    values = [*o.logprobs, *(v for top in o.top_logprobs for _, v in top)]
    assert not any(math.isnan(v) for v in values), "NaN logprob in the solo reference"
    tops = []
    for tid, x, top in zip(o.token_ids, o.logprobs, o.top_logprobs):
        entry = {tokens(t): lp(v) for t, v in top}
        entry.setdefault(tokens(tid), lp(x))
        tops.append(entry)
    return o.token_ids, tuple(lp(x) for x in o.logprobs), tops, o.finish_reason


async def _in_process(engine: AsyncEngine, r: Req) -> Outcome:
    ids: list[int] = []
    lps: list[float] = []
    tops: list[tuple[tuple[int, float], ...]] = []
    reason = None
    async for out in engine.generate(list(r.prompt), r.params, request_id=r.rid):
        ids += out.token_ids
        lps += out.logprobs
        tops += [tuple(t) for t in out.top_logprobs or ()]
        reason = out.finish_reason if out.finished else reason
    return Outcome(tuple(ids), tuple(lps), tuple(tops), reason)


async def _http(client: AsyncClient, r: Req, stream: bool) -> tuple[Any, ...]:
    sp = r.params
    body = dict(max_tokens=sp.max_tokens, temperature=sp.temperature, top_p=sp.top_p, seed=sp.seed,
                logprobs=sp.logprobs, ignore_eos=sp.ignore_eos)
    if stream:
        deltas = [d async for d in client.stream_complete(list(r.prompt), **body)]
    else:
        deltas = (await client.complete(list(r.prompt), **body)).choices
    ids = tuple(t for d in deltas for t in d.token_ids)
    lps = tuple(x for d in deltas for x in d.logprobs)
    tops = [t for d in deltas for t in d.top_logprobs or ()]
    return ids, lps, tops, deltas[-1].finish_reason


async def test_stream_and_http_match_offline_solo(tiny_dirs: dict[str, Path]) -> None:
    model = tiny_dirs["qwen2"]
    rng = random.Random("serving")
    reqs = [Req(f"r{i}", random_prompt(rng, rng.randint(1, 150), VOCAB), MODES[("greedy", "sampled")[i % 2]](i))
            for i in range(18)]
    reference = make_engine(model, num_threads=1, num_kv_blocks=1024)
    solo = {r.rid: run(reference, [r])[r.rid] for r in reqs}
    tokens = TokenStrings(reference.tokenizer)

    engine = AsyncEngine.from_config(EngineConfig(
        model=str(model), num_threads=1, num_kv_blocks=1024, max_num_batched_tokens=64))
    try:
        async with TestServer(create_app(engine, ["tiny"])) as server:
            async with AsyncClient(str(server.make_url("")).rstrip("/")) as client:
                calls = []
                for i, r in enumerate(reqs):
                    way = WAYS[i % 3]
                    calls.append(_in_process(engine, r) if way == WAYS[0] else _http(client, r, way == WAYS[1]))
                got = await asyncio.gather(*calls)
    finally:
        engine.shutdown()
    for i, (r, g) in enumerate(zip(reqs, got)):
        want = solo[r.rid] if WAYS[i % 3] == WAYS[0] else _http_view(solo[r.rid], tokens)
        assert g == want, (r.rid, WAYS[i % 3])
