"""Two tiny-model replicas as Ray actors on a local cluster (2 CPUs) behind one front:
routing and stickiness, fan-out with versions in lockstep, a killed replica survived."""
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import pytest_asyncio
import torch

ray = pytest.importorskip("ray")
from aiohttp.test_utils import TestClient, TestServer  # noqa: E402

from asyncengine.config import EngineConfig  # noqa: E402
from asyncengine.distributed.front import Front  # noqa: E402
from asyncengine.distributed.group import GroupOptions, ReplicaGroup  # noqa: E402
from tests.tiny_models import load_hf  # noqa: E402

pytestmark = [pytest.mark.ray, pytest.mark.asyncio(loop_scope="module")]
KEY = "admin-secret"
AUTH = {"Authorization": f"Bearer {KEY}"}
GREEDY = {"max_tokens": 6, "temperature": 0, "logprobs": 1}


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def front(llama_dir: Path) -> AsyncIterator[tuple[Front, TestClient]]:
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    config = EngineConfig(model=str(llama_dir), num_kv_blocks=128, max_model_len=256, num_threads=1)
    group = await ReplicaGroup.start(config, GroupOptions(num_replicas=2, num_cpus_per_replica=1), ["tiny"])
    from transformers import AutoTokenizer

    fr = Front(group, AutoTokenizer.from_pretrained(str(llama_dir)), block_size=16, admin_key=KEY)
    client = TestClient(TestServer(fr.app()))
    await client.start_server()
    try:
        yield fr, client
    finally:
        await client.close()
        await group.shutdown()
        ray.shutdown()


async def _complete(client: TestClient, body: dict[str, Any], headers: dict[str, str] | None = None
                    ) -> tuple[int, Any, str]:
    resp = await client.post("/v1/completions", json={"model": "tiny", **GREEDY, **body}, headers=headers)
    return resp.status, orjson.loads(await resp.read()), resp.headers.get("X-Replica", "")


async def test_every_endpoint_is_proxied_and_sessions_stick(front: tuple[Front, TestClient]) -> None:
    fr, client = front
    resp = await client.get("/v1/models")
    assert resp.status == 200 and (await resp.json())["data"][0]["id"] == "tiny"
    homes = {}
    for sid in ("alpha", "beta", "gamma", "delta", "epsilon", "zeta"):
        seen = {(await _complete(client, {"prompt": "Hello world"}, {"X-Session-ID": sid}))[2] for _ in range(3)}
        assert len(seen) == 1, f"session {sid} moved between replicas: {seen}"
        homes[sid] = seen.pop()
    assert set(homes.values()) == {"0", "1"}, "sessions spread over both replicas"
    status, body, _ = await _complete(client, {"prompt": "x", "max_tokens": -3})
    assert status == 400 and body["error"]["param"] == "max_tokens", "the replica's own 4xx comes through"


async def test_prefix_routing_and_streaming(front: tuple[Front, TestClient]) -> None:
    fr, client = front
    prompt = list(range(3, 3 + 40))  # two full blocks of 16
    _, ref, where = await _complete(client, {"prompt": prompt})
    for _ in range(3):
        _, again, there = await _complete(client, {"prompt": prompt + [50, 51]})
        assert there == where, "the same leading blocks go where they are cached"
    resp = await client.post("/v1/completions", json={"model": "tiny", **GREEDY, "prompt": prompt, "stream": True})
    raw = (await resp.read()).decode()
    events = [e[6:] for e in raw.split("\n\n") if e]
    assert events[-1] == "[DONE]"
    text = "".join(orjson.loads(e)["choices"][0]["text"] for e in events[:-1])
    assert text == ref["choices"][0]["text"]
    metrics = (await (await client.get("/metrics")).read()).decode()
    assert f'asyncengine_replica_prefix_routed{{replica="{where}"}} 4.0' in metrics


async def test_weight_update_fans_out_in_lockstep(front: tuple[Front, TestClient], llama_dir: Path) -> None:
    fr, client = front
    hf = load_hf(llama_dir)
    state = {k: v * 1.01 if v.is_floating_point() else v for k, v in hf.state_dict().items()}
    from safetensors.torch import save

    body = save({k: v.contiguous() for k, v in state.items() if k != "lm_head.weight"})
    resp = await client.post("/update_weights?mode=keep", data=body,
                             headers={**AUTH, "Content-Type": "application/octet-stream"})
    assert resp.status == 200, await resp.text()
    version = (await resp.json())["weight_version"]
    versions = await fr.group.call_all("weight_version")
    assert versions == [version, version], f"replicas out of lockstep: {versions}"
    checks = await client.get("/weight_checksums", headers=AUTH)
    assert checks.status == 200
    bad = save({"model.embed_tokens.weight": torch.zeros(3, 3)})
    resp = await client.post("/update_weights", data=bad, headers={**AUTH, "Content-Type": "application/octet-stream"})
    assert resp.status == 400 and await fr.group.call_all("weight_version") == [version, version]
    assert (await client.post("/pause", headers={"Authorization": "Bearer wrong"})).status == 403
    for body in (b"", b'{"reset_running_requests": true}'):  # fanned out as a function of the core
        resp = await client.post("/reset_prefix_cache", data=body, headers=AUTH)
        assert resp.status == 200 and (await resp.json())["success"], await resp.text()


async def test_weight_transfer_spans_every_replica(front: tuple[Front, TestClient], llama_dir: Path,
                                                   tmp_path: Path) -> None:
    """A real trainer process (rank 0, WeightSender) sees 2 engine ranks; one broadcast
    reaches both replicas, whose versions and weights stay in lockstep."""
    import os
    import sys

    from safetensors.torch import save_file

    fr, client = front
    resp = await client.get("/get_world_size", headers=AUTH)
    assert (await resp.json())["world_size"] == 2
    hf = load_hf(llama_dir)
    state = {k: (v * 0.97).contiguous() for k, v in hf.state_dict().items() if k != "lm_head.weight"}
    save_file(state, str(tmp_path / "w.safetensors"))
    before = await fr.group.call_all("weight_version")
    root = Path(__file__).resolve().parents[1]
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tests.rl_trainer", str(client.make_url("")).rstrip("/"), KEY,
        str(tmp_path / "w.safetensors"), "ok", cwd=str(root), env={**os.environ, "PYTHONPATH": str(root)},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 240)
    assert proc.returncode == 0, err.decode()[-2000:]
    version = orjson.loads(out.decode().strip().splitlines()[-1])["weight_version"]
    assert await fr.group.call_all("weight_version") == [version, version] and version == before[0] + 1
    sums = await fr.group.call_all("weight_checksums")
    assert sums[0] == sums[1], "both replicas received the same tensors"
    status, body, _ = await _complete(client, {"prompt": "Hello world"})
    assert status == 200, body


async def _wait_dead(actor: Any) -> None:
    for _ in range(100):
        try:
            await asyncio.wait_for(actor.health.remote(), 1.0)
        except Exception:  # RayActorError once it is gone
            return
        await asyncio.sleep(0.1)
    raise AssertionError("the killed actor still answers")


async def _wait_until_whole(client: TestClient) -> None:
    for _ in range(240):  # a replacement loads in the background
        if (await (await client.get("/health")).json())["status"] == "ok":
            return
        await asyncio.sleep(0.5)
    raise AssertionError("no replacement joined")


async def test_a_replica_killed_mid_stream_ends_its_stream_with_an_error(front: tuple[Front, TestClient]) -> None:
    fr, client = front
    body = {"model": "tiny", "prompt": "Hello", "max_tokens": 200, "ignore_eos": True, "stream": True}
    resp = await client.post("/v1/completions", json=body)
    index = int(resp.headers["X-Replica"])
    first = await resp.content.readuntil(b"\n\n")
    assert first.startswith(b"data: {")
    victim = fr.group.replicas[index].actor
    fr.auto_replace = False  # a fast replacement would take the index back before the checks below
    await victim.pause.remote("keep")  # the stream stalls: the kill below lands mid-stream
    ray.kill(victim, no_restart=True)
    rest = (await resp.read()).decode()
    events = [e for e in rest.split("\n\n") if e]
    assert events[-1] == "data: [DONE]"
    err = orjson.loads(events[-2][6:])
    assert err["error"]["code"] == "replica_failed" and err["error"]["type"] == "server_error"
    health = await (await client.get("/health")).json()
    assert health["status"] in ("degraded", "ok")
    status, _, where = await _complete(client, {"prompt": "Hello world"})
    assert status == 200 and where == str(1 - index), "the router stopped sending to it"
    fr.auto_replace = True
    fr._on_down(index)  # what the failure did, now with replacement on
    await _wait_until_whole(client)


async def test_a_killed_replica_is_survived_and_replaced(front: tuple[Front, TestClient]) -> None:
    fr, client = front
    victim = fr.group.replicas[0]
    version = fr.group.weight_version
    fr.auto_replace = False  # a fast replacement would take index 0 back before the checks below
    ray.kill(victim.actor, no_restart=True)
    await _wait_dead(victim.actor)  # ray.kill returns before the process is gone
    for _ in range(4):  # nothing streamed yet: retried on the survivor
        status, body, where = await _complete(client, {"prompt": "Hello world"})
        assert status == 200 and where == "1", body
    health = await (await client.get("/health")).json()
    assert health["status"] == "degraded" and not health["replicas"][0]["up"]
    fr.auto_replace = True
    fr._on_down(0)
    await _wait_until_whole(client)
    assert await fr.group.call_all("weight_version") == [version, version]
    sums = await fr.group.call_all("weight_checksums")
    assert sums[0] == sums[1], "the replacement serves the group's current weights"
