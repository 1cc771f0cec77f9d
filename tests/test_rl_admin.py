"""RL admin endpoints over HTTP: auth, allowed paths, uploads, versions in SSE chunks."""
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp.test_utils import TestClient, TestServer

from api.admin import add_admin_routes
from api.server import create_app
from asyncengine.async_engine import AsyncEngine
from asyncengine.config import EngineConfig
from asyncengine.models.weights import read_safetensors
from tests.step_gate import StepGate, all_running
from tests.tiny_models import make_model_dir

KEY = "s3cret"
AUTH = {"Authorization": f"Bearer {KEY}"}
SMALL_BODY = 64 * 2**10  # the app's JSON limit; a tiny checkpoint (~390 KB) is larger
ADMIN_ROUTES = [("POST", "/pause"), ("POST", "/resume"), ("GET", "/is_paused"), ("POST", "/reset_prefix_cache"),
                ("POST", "/update_weights"), ("GET", "/weight_version"), ("GET", "/weight_checksums"),
                ("GET", "/get_world_size"), ("GET", "/server_info"), ("POST", "/init_weight_transfer_engine"),
                ("POST", "/start_weight_update"), ("POST", "/finish_weight_update")]


@pytest.fixture(scope="module")
def weights_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """allowed/v1 (a second checkpoint), allowed/escape -> outside/v1 (a symlink out), outside/v1."""
    root = tmp_path_factory.mktemp("weights")
    make_model_dir(root / "allowed" / "v1", "llama", seed=123)
    make_model_dir(root / "outside" / "v1", "llama", seed=7)
    (root / "allowed" / "escape").symlink_to(root / "outside" / "v1")
    return root


@pytest.fixture
async def engine(llama_dir: Path) -> AsyncIterator[AsyncEngine]:
    eng = AsyncEngine.from_config(EngineConfig(model=str(llama_dir), num_kv_blocks=256, max_model_len=256,
                                               num_threads=1))
    yield eng
    eng.shutdown()


async def make_client(engine: AsyncEngine, key: str | None, allowed: Path | None) -> TestClient:
    app = create_app(engine, ["tiny"], SMALL_BODY)
    add_admin_routes(app, engine, key, allowed)
    client = TestClient(TestServer(app))
    await client.start_server()
    return client


@pytest.fixture
async def client(engine: AsyncEngine, weights_root: Path) -> AsyncIterator[TestClient]:
    c = await make_client(engine, KEY, weights_root / "allowed")
    yield c
    await c.close()


async def call(client: TestClient, method: str, path: str, body: Any = None,
               headers: dict[str, str] | None = None) -> tuple[int, Any]:
    headers = dict(headers if headers is not None else AUTH)
    if body is not None and not isinstance(body, bytes):
        body, headers["Content-Type"] = orjson.dumps(body), "application/json"
    resp = await client.request(method, path, data=body, headers=headers)
    return resp.status, orjson.loads(await resp.read())


async def test_admin_is_off_without_a_key(engine: AsyncEngine) -> None:
    client = await make_client(engine, None, None)
    try:
        for method, path in ADMIN_ROUTES:
            status, body = await call(client, method, path)
            assert status == 404 and "error" in body, path
    finally:
        await client.close()


async def test_admin_needs_the_right_key(client: TestClient) -> None:
    for method, path in ADMIN_ROUTES:
        assert (await call(client, method, path, headers={}))[0] == 401
        status, body = await call(client, method, path, headers={"Authorization": "Bearer wrong"})
        assert status == 403 and body["error"]["type"] == "permission_error"
    assert (await call(client, "GET", "/weight_version"))[1] == {"weight_version": 0}


async def test_paths_must_stay_inside_the_allowed_dir(client: TestClient, engine: AsyncEngine,
                                                      weights_root: Path) -> None:
    refused = [str(weights_root / "outside" / "v1"), "../outside/v1", str(weights_root / "allowed" / "escape"),
               "escape/model.safetensors", "/etc/passwd"]
    for path in refused:
        status, body = await call(client, "POST", "/update_weights", {"path": path})
        assert status == 403 and body["error"]["code"] == "path_not_allowed", path
    assert (await call(client, "POST", "/update_weights", {"path": "nope"}))[0] == 404
    assert (await call(client, "POST", "/update_weights", {"path": "v1", "mode": "sideways"}))[0] == 400
    assert engine.weight_version == 0
    status, body = await call(client, "POST", "/update_weights", {"path": "v1", "mode": "keep"})
    assert (status, body) == (200, {"weight_version": 1})
    status, body = await call(client, "POST", "/update_weights",
                              {"path": str(weights_root / "allowed" / "v1" / "model.safetensors")})
    assert (status, body) == (200, {"weight_version": 2})


async def test_octet_stream_upload_and_checksums(client: TestClient, engine: AsyncEngine,
                                                 weights_root: Path) -> None:
    blob = (weights_root / "allowed" / "v1" / "model.safetensors").read_bytes()
    assert len(blob) > SMALL_BODY
    status, old = await call(client, "GET", "/weight_checksums")
    assert status == 200 and old["weight_version"] == 0
    octet = {**AUTH, "Content-Type": "application/octet-stream"}
    assert (await call(client, "POST", "/update_weights?mode=abort", blob, octet)) == (200, {"weight_version": 1})
    status, new = await call(client, "GET", "/weight_checksums")
    assert new["weight_version"] == 1 and new["checksums"] == engine.core.weight_checksums()
    assert all(new["checksums"][k] != old["checksums"][k] for k in old["checksums"])
    # Other routes keep the small limit.
    status, body = await call(client, "POST", "/v1/completions", {"prompt": [1] * 40_000}, {})
    assert status == 413


async def test_bad_weights_are_a_400_and_change_nothing(client: TestClient, engine: AsyncEngine,
                                                        weights_root: Path) -> None:
    from safetensors.torch import save

    state = read_safetensors(weights_root / "allowed" / "v1")
    state.pop("model.norm.weight")
    octet = {**AUTH, "Content-Type": "application/octet-stream"}
    for blob in (save(state), b"garbage", b""):
        status, body = await call(client, "POST", "/update_weights", blob, octet)
        assert status == 400 and body["error"]["message"], blob[:10]
    assert "model.norm.weight" in (await call(client, "POST", "/update_weights", save(state), octet))[1]["error"][
        "message"]
    assert engine.weight_version == 0


async def test_pause_resume_endpoints(client: TestClient, engine: AsyncEngine) -> None:
    assert await call(client, "GET", "/is_paused") == (200, {"is_paused": False})
    assert (await call(client, "POST", "/pause?mode=keep"))[1]["is_paused"] is True
    assert await call(client, "GET", "/is_paused") == (200, {"is_paused": True})
    body = {"prompt": [5, 6, 7], "max_tokens": 3, "ignore_eos": True}
    pending = asyncio.create_task(call(client, "POST", "/v1/completions", body, {}))
    await asyncio.sleep(0.05)
    assert not pending.done()
    assert (await call(client, "POST", "/resume"))[1] == {"is_paused": False}
    status, out = await pending
    assert status == 200 and out["choices"][0]["finish_reason"] == "length"
    assert (await call(client, "POST", "/pause?mode=wait"))[1]["is_paused"] is True
    assert (await call(client, "POST", "/pause?mode=abort"))[0] == 200
    assert (await call(client, "POST", "/pause?mode=later"))[0] == 400
    assert (await call(client, "POST", "/reset_prefix_cache")) == (
        200, {"status": "ok", "success": True, "reset_running_requests": False})
    await call(client, "POST", "/resume")


async def test_pause_clear_cache_and_reset_running_requests(client: TestClient, engine: AsyncEngine) -> None:
    """SkyRL's /pause?mode=keep&clear_cache=true and /reset_prefix_cache {"reset_running_requests"}."""
    prompt = list(range(40, 80))
    warm = {"prompt": prompt, "max_tokens": 1}
    assert (await call(client, "POST", "/v1/completions", warm, {}))[0] == 200  # its blocks are now cached
    status, body = await call(client, "POST", "/pause?mode=keep&clear_cache=true")
    assert status == 200 and body == {"is_paused": True, "mode": "keep", "clear_cache": True}
    await call(client, "POST", "/resume")
    hit = engine.stats()["prefix_hit_tokens"]
    assert (await call(client, "POST", "/v1/completions", warm, {}))[0] == 200
    assert engine.stats()["prefix_hit_tokens"] == hit  # cleared: nothing reused
    assert (await call(client, "POST", "/pause?clear_cache=maybe"))[0] == 400
    # A request in flight: reset_running_requests preempts it (it recomputes, and still finishes).
    body = {"prompt": prompt, "max_tokens": 40, "ignore_eos": True}
    pending = asyncio.create_task(call(client, "POST", "/v1/completions", body, {}))
    while engine.stats()["num_running"] == 0:
        await asyncio.sleep(0.005)
    preempted = engine.stats()["num_preemptions"]
    status, out = await call(client, "POST", "/reset_prefix_cache", {"reset_running_requests": True})
    assert (status, out["success"], out["reset_running_requests"]) == (200, True, True)
    status, done = await pending
    assert status == 200 and done["choices"][0]["finish_reason"] == "length"
    assert engine.stats()["num_preemptions"] == preempted + 1
    for bad in ({"reset_running_requests": "yes"}, {"other": 1}, [1]):
        assert (await call(client, "POST", "/reset_prefix_cache", bad))[0] == 400, bad
    assert engine.stats()["num_free_blocks"] == engine.stats()["num_total_blocks"]


async def test_sse_chunks_carry_the_version_of_each_token(client: TestClient, engine: AsyncEngine) -> None:
    """Mid-stream (the pause lands at the step boundary after the first token, held there
    by a gate, not by timing): pause, swap, resume; the chunks say v0, then v1."""
    gate = StepGate(engine, all_running(1))
    body = {"prompt": list(range(10, 30)), "max_tokens": 24, "ignore_eos": True, "stream": True,
            "return_weight_versions": True}

    async def stream_versions() -> list[int]:
        resp = await client.post("/v1/completions", json=body)
        versions: list[int] = []
        async for line in resp.content:
            if line.startswith(b"data: {"):
                versions += orjson.loads(line[6:])["choices"][0].get("weight_versions", [])
        return versions

    reading = asyncio.create_task(stream_versions())
    assert (await (await gate.land(call(client, "POST", "/pause"))))[0] == 200
    assert (await call(client, "POST", "/update_weights", {"path": "v1"}))[0] == 200
    await call(client, "POST", "/resume")
    versions = await reading
    assert len(versions) == 24 and versions == sorted(versions) and versions[0] == 0 and versions[-1] == 1


def test_serve_cli_wires_the_admin_flags(llama_dir: Path, tmp_path: Path) -> None:
    """`asyncengine serve --admin-key K --allowed-weights-dir D` reaches create_app."""
    from asyncengine.cli import build_parser

    args = build_parser().parse_args(["serve", "--model", str(llama_dir), "--admin-key", "k",
                                      "--allowed-weights-dir", str(tmp_path)])
    assert args.admin_key == "k" and Path(args.allowed_weights_dir) == tmp_path
