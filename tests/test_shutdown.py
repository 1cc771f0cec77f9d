"""SIGTERM on a real server process: in-flight requests drain for at most
--shutdown-timeout seconds, the rest end with finish_reason "abort", new connections are
refused, the exit code is 0; after a fatal engine error the exit code is 1."""
from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from bench.server_process import start_server
from tests.tiny_models import make_model_dir

SHUTDOWN_S = 1.5


@pytest.fixture(scope="module")
def long_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # A long context, so one request can outlast the shutdown timeout.
    return make_model_dir(tmp_path_factory.mktemp("long") / "llama", "llama", seed=0, max_position_embeddings=8192)


def _flags(model: Path, *extra: str) -> list[str]:
    return ["--model", str(model), "--num-kv-blocks", "1024", "--num-threads", "1", *extra]


@pytest.fixture
def logfile(tmp_path: Path) -> Iterator[Path]:
    yield tmp_path / "server.log"


async def _stream(session: aiohttp.ClientSession, url: str, body: dict[str, Any], started: asyncio.Event
                  ) -> list[Any]:
    async with session.post(url + "/v1/completions", json={**body, "stream": True}) as resp:
        assert resp.status == 200
        events = []
        async for line in resp.content:
            if line.startswith(b"data: "):
                events.append(line[6:].strip())
                started.set()
    assert events[-1] == b"[DONE]"
    return [orjson.loads(e) for e in events[:-1]]


async def test_sigterm_drains_then_aborts_and_exits_0(long_model: Path, logfile: Path) -> None:
    proc, url = start_server(_flags(long_model, "--shutdown-timeout", str(SHUTDOWN_S)), logfile)
    try:
        async with aiohttp.ClientSession() as session:
            short_started, long_started = asyncio.Event(), asyncio.Event()
            long_task = asyncio.create_task(_stream(
                session, url, {"prompt": "hi", "max_tokens": 6000, "ignore_eos": True}, long_started))
            await asyncio.wait_for(long_started.wait(), 60)
            short_task = asyncio.create_task(_stream(
                session, url, {"prompt": "ho", "max_tokens": 40, "ignore_eos": True}, short_started))
            await asyncio.wait_for(short_started.wait(), 60)
            t0 = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            short, long = await asyncio.wait_for(asyncio.gather(short_task, long_task), 60)
            ended = time.monotonic() - t0
            # The short one drained to its end; the long one was cut at the timeout with "abort".
            assert short[-1]["choices"][0]["finish_reason"] == "length"
            assert sum(len(e["choices"][0]["text"]) > 0 for e in short) > 0
            assert long[-1]["choices"][0]["finish_reason"] == "abort"
            assert SHUTDOWN_S - 0.2 <= ended
            with pytest.raises(aiohttp.ClientConnectionError):  # no longer listening
                async with session.post(url + "/v1/completions", json={"prompt": "x", "max_tokens": 1}) as r:
                    await r.read()
        assert proc.wait(30) == 0
    finally:
        proc.kill()
        proc.wait()


async def test_fatal_engine_error_exits_non_zero(long_model: Path, logfile: Path) -> None:
    proc, url = start_server(_flags(long_model), logfile, module=("tests.fault_server",))
    try:
        async with aiohttp.ClientSession() as session:
            async with session.post(url + "/v1/completions", json={"prompt": "hi", "max_tokens": 20}) as resp:
                body = orjson.loads(await resp.read())
                assert resp.status == 500 and body["error"]["code"] == "engine_dead"
            async with session.get(url + "/health") as resp:
                assert resp.status == 503 and "injected fatal" in (await resp.text())
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 1
    finally:
        proc.kill()
        proc.wait()
