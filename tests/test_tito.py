"""vLLM's token-in/token-out endpoint, POST /inference/v1/generate, on a tiny random Llama."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import pytest
import torch
from aiohttp.test_utils import TestClient, TestServer

from api.protocol import IGNORED_FIELDS_HEADER
from api.server import create_app
from asyncengine.async_engine import AsyncEngine
from asyncengine.kv_cache_manager import hash_block
from tests.test_server import MODEL, client, engine, post, wait_idle  # noqa: F401 (fixtures)
from tests.tiny_models import load_hf

G = "/inference/v1/generate"
PROMPT = [1, 40, 41, 42, 43, 44, 45, 46, 47, 48, 49, 50, 51, 52, 53, 54, 55, 56, 57, 58]


def hf_logprobs(model_dir: Path, prompt: list[int], out: list[int], temperature: float = 1.0) -> torch.Tensor:
    """log_softmax(z / T) of each output token, recomputed by HF in fp32 over prompt + output."""
    seq = prompt + out
    with torch.no_grad():
        logits = load_hf(model_dir)(torch.tensor([seq])).logits[0].float()
    lps = (logits / temperature).log_softmax(-1)
    return lps[torch.arange(len(prompt) - 1, len(seq) - 1), torch.tensor(out)]


def tok_id(s: str) -> int:
    assert s.startswith("token_id:")
    return int(s.removeprefix("token_id:"))


@pytest.mark.parametrize("temperature", [1.0, 0.7])
async def test_logprobs_equal_hf_fp32_and_token_id_strings(client: TestClient, llama_dir: Path,
                                                           temperature: float) -> None:
    body = {"model": MODEL, "token_ids": PROMPT,
            "sampling_params": {"max_tokens": 12, "temperature": temperature, "seed": 7, "logprobs": 3}}
    status, res = await post(client, G, body)
    assert status == 200, res
    assert set(res) >= {"request_id", "choices", "usage", "prompt_logprobs"} and res["prompt_logprobs"] is None
    (choice,) = res["choices"]
    ids, content = choice["token_ids"], choice["logprobs"]["content"]
    assert len(ids) == len(content) == res["usage"]["completion_tokens"] == 12
    assert [tok_id(e["token"]) for e in content] == ids
    for e in content:  # top-N in the same (processed) mode, best first, as token_id strings
        tops = [(tok_id(t["token"]), t["logprob"]) for t in e["top_logprobs"]]
        assert len(tops) == 3 and [x for _, x in tops] == sorted((x for _, x in tops), reverse=True)
        assert e["logprob"] <= tops[0][1]
    got = torch.tensor([e["logprob"] for e in content])
    torch.testing.assert_close(got, hf_logprobs(llama_dir, PROMPT, ids, temperature), atol=1e-5, rtol=0)
    assert choice["weight_versions"] == [0] * 12 and choice["finish_reason"] == "length"
    assert res["usage"]["prompt_tokens"] == len(PROMPT)


async def test_stream_equals_non_stream(client: TestClient, engine: AsyncEngine) -> None:
    body = {"token_ids": PROMPT, "sampling_params": {"max_tokens": 10, "seed": 3, "logprobs": 1, "n": 2}}
    _, full = await post(client, G, body)
    resp = await client.post(G, json={**body, "stream": True, "stream_options": {"include_usage": True}})
    assert resp.status == 200 and resp.headers["Content-Type"].startswith("text/event-stream")
    events = [e for e in (await resp.read()).decode().split("\n\n") if e]
    assert events[-1] == "data: [DONE]"
    chunks = [orjson.loads(e[6:]) for e in events[:-1]]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == full["usage"]
    acc: dict[int, dict[str, Any]] = {}
    for ch in chunks[:-1]:
        assert set(ch) == {"request_id", "choices"}
        for c in ch["choices"]:
            a = acc.setdefault(c["index"], {"ids": [], "lps": [], "wv": [], "finish": None})
            a["ids"] += c["token_ids"]
            a["lps"] += c["logprobs"]["content"]
            a["wv"] += c["weight_versions"]
            a["finish"] = c["finish_reason"] or a["finish"]
    for c in full["choices"]:
        a = acc[c["index"]]
        assert (a["ids"], a["lps"], a["wv"], a["finish"]) == (
            c["token_ids"], c["logprobs"]["content"], c["weight_versions"], c["finish_reason"])
    assert full["choices"][0]["token_ids"] != full["choices"][1]["token_ids"]  # seed + index
    await wait_idle(engine)


async def test_prompt_logprobs_in_vllm_shape_equal_hf(client: TestClient, llama_dir: Path) -> None:
    body = {"token_ids": PROMPT, "sampling_params": {"max_tokens": 1, "prompt_logprobs": 2, "temperature": 0}}
    _, res = await post(client, G, body)
    plp = res["prompt_logprobs"]
    assert len(plp) == len(PROMPT) and plp[0] is None
    with torch.no_grad():
        ref = load_hf(llama_dir)(torch.tensor([PROMPT])).logits[0].float().log_softmax(-1)
    for pos in range(1, len(PROMPT)):
        entry = plp[pos]
        actual = entry[str(PROMPT[pos])]
        assert abs(actual["logprob"] - ref[pos - 1, PROMPT[pos]].item()) <= 1e-5
        tops = sorted(((v["rank"], int(k), v["logprob"]) for k, v in entry.items() if v["rank"] <= 2))
        want = ref[pos - 1].topk(2)
        assert [t for _, t, _ in tops] == want.indices.tolist()
        assert actual["rank"] <= 2 or actual["rank"] == 3  # outside the top-2: reported as k + 1
        assert all(v["decoded_token"] == f"token_id:{k}" for k, v in entry.items())


async def test_weight_versions_follow_an_update(client: TestClient, engine: AsyncEngine, llama_dir: Path) -> None:
    before = engine.weight_version
    await engine.update_weights(load_hf(llama_dir).state_dict())
    _, res = await post(client, G, {"token_ids": PROMPT, "sampling_params": {"max_tokens": 4, "seed": 1}})
    assert res["choices"][0]["weight_versions"] == [before + 1] * 4
    assert res["choices"][0]["logprobs"] is None  # logprobs not asked for


async def test_cache_salt_separates_prefix_cache(client: TestClient, engine: AsyncEngine) -> None:
    prompt = list(range(60, 60 + 70))  # several full blocks
    sp = {"max_tokens": 1, "temperature": 0}

    async def cached(salt: str | None) -> int:
        body: dict[str, Any] = {"token_ids": prompt, "sampling_params": sp, **({"cache_salt": salt} if salt else {})}
        status, res = await post(client, G, body)
        assert status == 200, res
        return int(res["usage"]["prompt_tokens_details"]["cached_tokens"])

    await engine.reset_prefix_cache()
    assert await cached("tenant-a") == 0
    assert await cached("tenant-a") > 0  # same salt: hits
    assert await cached("tenant-b") == 0  # another salt: no hits
    assert await cached(None) == 0  # no salt is its own namespace
    assert await cached(None) > 0


def test_cache_salt_roots_the_hash_chain() -> None:
    plain, a = hash_block(None, 0, [1, 2]), hash_block(None, 0, [1, 2], "a")
    assert len({plain, a, hash_block(None, 0, [1, 2], "b")}) == 3 and a == hash_block(None, 0, [1, 2], "a")
    assert hash_block(a, 0, [3]) != hash_block(plain, 0, [3])  # the salt carries down the chain


async def test_unknown_keys_ignored_and_named(client: TestClient) -> None:
    body = {"token_ids": PROMPT, "features": None, "kv_transfer_params": None, "mystery": 1,
            "sampling_params": {"max_tokens": 2, "output_kind": 2, "truncate_prompt_tokens": None}}
    resp = await client.post(G, json=body)
    assert resp.status == 200
    assert resp.headers[IGNORED_FIELDS_HEADER] == "kv_transfer_params, mystery, output_kind, truncate_prompt_tokens"


async def test_strict_mode_refuses_unknown_keys(engine: AsyncEngine) -> None:
    async with TestClient(TestServer(create_app(engine, [MODEL], strict_request_fields=True))) as c:
        status, res = await post(c, G, {"token_ids": PROMPT, "sampling_params": {"output_kind": 2}})
        assert status == 400 and res["error"]["param"] == "output_kind"
        status, _ = await post(c, G, {"token_ids": PROMPT, "sampling_params": {"max_tokens": 1}})
        assert status == 200


@pytest.mark.parametrize(("body", "param"), [
    ({}, "token_ids"),
    ({"token_ids": []}, "token_ids"),
    ({"token_ids": "1 2 3"}, "token_ids"),
    ({"token_ids": [1, 100_000]}, "token_ids"),
    ({"token_ids": [1, True]}, "token_ids"),
    ({"token_ids": PROMPT, "sampling_params": [1]}, "sampling_params"),
    ({"token_ids": PROMPT, "sampling_params": {"max_tokens": "4"}}, "max_tokens"),
    ({"token_ids": PROMPT, "sampling_params": {"temperature": -1}}, "temperature"),
    ({"token_ids": PROMPT, "sampling_params": {"logprobs": 50}}, "logprobs"),
    ({"token_ids": PROMPT, "sampling_params": {"logprobs": -1}}, "logprobs"),
    ({"token_ids": PROMPT, "sampling_params": {"prompt_logprobs": 21}}, "prompt_logprobs"),
    ({"token_ids": PROMPT, "sampling_params": {"n": 0}}, "n"),
    ({"token_ids": PROMPT, "sampling_params": {"stop": [3]}}, "stop"),
    ({"token_ids": PROMPT, "cache_salt": ""}, "cache_salt"),
    ({"token_ids": PROMPT, "cache_salt": "x" * 129}, "cache_salt"),
    ({"token_ids": PROMPT, "cache_salt": 5}, "cache_salt"),
    ({"token_ids": PROMPT, "priority": 3}, "priority"),
    ({"token_ids": PROMPT, "features": {"mm_hashes": {}}}, "features"),
    ({"token_ids": PROMPT, "model": "other"}, "model"),
    ({"token_ids": PROMPT, "sampling_params": {"max_tokens": 300}}, "max_tokens"),
])
async def test_bad_input_is_4xx(client: TestClient, engine: AsyncEngine, body: dict[str, Any], param: str) -> None:
    status, res = await post(client, G, body)
    assert status == (404 if param == "model" else 400), res
    assert res["error"]["param"] == param and res["error"]["type"] == "invalid_request_error"
    assert engine.is_healthy


async def test_overlong_prompt_keeps_vllm_text(client: TestClient) -> None:
    status, res = await post(client, G, {"token_ids": [5] * 300})
    assert status == 400 and res["error"]["message"].startswith("This model's maximum context length is 256 tokens.")
    assert res["error"]["code"] == "context_length_exceeded"
