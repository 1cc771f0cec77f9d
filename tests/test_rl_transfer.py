"""vLLM's weight-transfer protocol on gloo, driven by a real trainer process (rank 0)."""
from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import torch
from aiohttp.test_utils import TestClient, TestServer

from api.admin import add_admin_routes
from api.server import create_app
from asyncengine.async_engine import AsyncEngine
from asyncengine.config import EngineConfig
from asyncengine.outputs import CompletionResult
from asyncengine.sampling_params import SamplingParams
from tests.tiny_models import make_model_dir

KEY = "k3y"
AUTH = {"Authorization": f"Bearer {KEY}"}
PROMPT = list(range(10, 30))
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def new_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_model_dir(tmp_path_factory.mktemp("v1") / "llama", "llama", seed=321)


@pytest.fixture
async def served(llama_dir: Path) -> AsyncIterator[tuple[AsyncEngine, TestClient]]:
    eng = AsyncEngine.from_config(EngineConfig(model=str(llama_dir), num_kv_blocks=128, max_model_len=256,
                                               num_threads=1))
    app = create_app(eng, ["tiny"])
    add_admin_routes(app, eng, KEY, None, transfer_timeout_s=4.0)
    client = TestClient(TestServer(app, host="127.0.0.1"))
    await client.start_server()
    yield eng, client
    await client.close()
    eng.shutdown()


async def spawn(client: TestClient, weights: Path, scenario: str) -> asyncio.subprocess.Process:
    url = str(client.make_url("")).rstrip("/")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return await asyncio.create_subprocess_exec(sys.executable, "-m", "tests.rl_trainer", url, KEY, str(weights),
                                                scenario, cwd=str(ROOT), env=env,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)


async def trainer(client: TestClient, weights: Path, scenario: str) -> tuple[int, str]:
    """Run tests/rl_trainer.py as a separate process; its exit code and stdout."""
    proc = await spawn(client, weights, scenario)
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode is not None
    return proc.returncode, out.decode() + err.decode()[-2000:]


async def call(client: TestClient, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    resp = await client.request(method, path, data=None if body is None else orjson.dumps(body),
                                headers={**AUTH, "Content-Type": "application/json"})
    return resp.status, orjson.loads(await resp.read())


async def greedy(eng: AsyncEngine) -> CompletionResult:
    sp = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    res = CompletionResult("r", PROMPT)
    async for out in eng.generate(PROMPT, sp):
        res.add(out)
    return res


def hf_logprobs(model_dir: Path, tokens: list[int]) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    with torch.no_grad():
        logits = hf(torch.tensor([PROMPT + tokens])).logits[0, len(PROMPT) - 1 : -1]  # [N, V]
    return torch.log_softmax(logits.float(), -1).gather(1, torch.tensor(tokens)[:, None])[:, 0]


@pytest.mark.parametrize("scenario", ["ok", "raw", "raw_packed", "per_tensor", "small_buckets"])
async def test_weights_arrive_and_equal_hf(served: tuple[AsyncEngine, TestClient], new_dir: Path,
                                           scenario: str) -> None:
    eng, client = served
    assert await call(client, "GET", "/get_world_size") == (200, {"world_size": 1})
    status, info = await call(client, "GET", "/server_info?config_format=json")
    assert status == 200 and info["vllm_config"]["weight_transfer_config"] == {"backend": "gloo"}
    rc, out = await trainer(client, new_dir, scenario)
    assert rc == 0, out
    version = 7 if scenario.startswith("raw") else 1  # the raw trainer labels its weights 7
    assert f'"weight_version":{version}' in out and eng.weight_version == version
    res = await greedy(eng)
    assert set(res.weight_versions) == {version}
    want = hf_logprobs(new_dir, res.token_ids)
    assert torch.allclose(torch.tensor(res.logprobs), want, atol=1e-5, rtol=0), (res.logprobs, want)
    # The next init (a second trainer session) works too.
    rc, out = await trainer(client, new_dir, "ok")
    assert rc == 0 and eng.weight_version == version + 1, out


async def assert_old_weights_serving(eng: AsyncEngine, before: CompletionResult, client: TestClient,
                                     new_dir: Path) -> None:
    after = await greedy(eng)
    assert eng.weight_version == 0 and eng.is_healthy
    assert (after.token_ids, after.logprobs) == (before.token_ids, before.logprobs)
    rc, out = await trainer(client, new_dir, "ok")  # and the next init works
    assert rc == 0 and eng.weight_version == 1, out


@pytest.mark.parametrize("scenario", ["die", "die_packed", "stall", "wrong_shape"])
async def test_failed_transfer_leaves_old_weights(served: tuple[AsyncEngine, TestClient], new_dir: Path,
                                                  scenario: str) -> None:
    eng, client = served
    before = await greedy(eng)
    rc, out = await trainer(client, new_dir, scenario)
    if scenario == "wrong_shape":
        assert "does not match the model" in out and "400" in out, out
    # Once the engine notices (the dead peer's socket, or its timeout of 4 s), the update
    # is abandoned: a finish has nothing to apply.
    for _ in range(200):
        status, body = await call(client, "POST", "/finish_weight_update", {})
        if body["error"]["code"] != "transfer_in_progress":
            break
        await asyncio.sleep(0.05)
    assert status == 409 and body["error"]["code"] == "no_update_in_progress", (body, out)
    await assert_old_weights_serving(eng, before, client, new_dir)


async def test_protocol_errors_are_4xx(served: tuple[AsyncEngine, TestClient]) -> None:
    eng, client = served
    before = await greedy(eng)
    status, body = await call(client, "POST", "/start_weight_update", {})
    assert status == 409 and body["error"]["code"] == "no_transfer_group"  # no init
    meta = {"names": ["model.norm.weight"], "dtype_names": ["float32"], "shapes": [[64]]}
    assert (await call(client, "POST", "/update_weights", {"update_info": meta}))[0] == 409
    assert (await call(client, "POST", "/finish_weight_update", {}))[0] == 409
    bad_inits = [{}, {"init_info": {"master_address": "127.0.0.1", "master_port": 1, "rank_offset": 0,
                                    "world_size": 2}},
                 {"init_info": {"master_address": "127.0.0.1", "master_port": 1, "rank_offset": 1,
                                "world_size": 2, "packed": True}},
                 {"init_info": {"master_address": "127.0.0.1", "master_port": "x", "rank_offset": 1,
                                "world_size": 2}}]
    for body in bad_inits:
        status, err = await call(client, "POST", "/init_weight_transfer_engine", body)
        assert status == 400 and err["error"]["message"], body
    assert eng.weight_version == 0 and (await greedy(eng)).logprobs == before.logprobs


async def test_concurrent_start_is_refused(served: tuple[AsyncEngine, TestClient], new_dir: Path) -> None:
    """A trainer process holds an open update; a second start meanwhile is a 409."""
    eng, client = served
    proc = await spawn(client, new_dir, "hold")
    assert proc.stdout is not None
    line = await asyncio.wait_for(proc.stdout.readline(), 60)
    assert line.strip() == b"started"
    status, body = await call(client, "POST", "/start_weight_update", {})
    assert status == 409 and body["error"]["code"] == "update_in_progress"
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0 and b'"weight_version":1' in out, err[-2000:]
    assert eng.weight_version == 1


def test_staging_partial_and_full_updates(llama_dir: Path, new_dir: Path) -> None:
    """A partial update keeps the other tensors; a full one replaces all; the live model is untouched."""
    from asyncengine.engine_core import EngineCore
    from asyncengine.models.weights import read_safetensors, weight_checksums
    from asyncengine.rl.staging import stage, swap_in

    core = EngineCore(EngineConfig(model=str(llama_dir), num_kv_blocks=16, num_threads=1))
    old = weight_checksums(core.model)
    new_state = read_safetensors(new_dir)
    shadow = stage(core.model, {"model.norm.weight": new_state["model.norm.weight"]})
    assert weight_checksums(core.model) == old  # staged aside
    swap_in(core.model, shadow)
    now = weight_checksums(core.model)
    assert [k for k in old if now[k] != old[k]] == ["model.norm.weight"]
    swap_in(core.model, stage(core.model, new_state))
    core_new = EngineCore(EngineConfig(model=str(new_dir), num_kv_blocks=16, num_threads=1))
    assert weight_checksums(core.model) == weight_checksums(core_new.model)
