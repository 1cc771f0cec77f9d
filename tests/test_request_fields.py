"""The vLLM/OpenAI request fields RL clients send (TRL, ART, verifiers, openai-agents), over HTTP."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import openai
import pytest
import torch
from aiohttp.test_utils import TestClient, TestServer

from api.protocol import IGNORED_FIELDS_HEADER
from api.server import create_app
from asyncengine.async_engine import AsyncEngine
from tests.test_server import MODEL, TEXT, client, engine, post  # noqa: F401 (fixtures)
from tests.tiny_models import CHATML, load_hf

C, CHAT = "/v1/completions", "/v1/chat/completions"
USER = [{"role": "user", "content": "Hello world!"}]


@pytest.fixture
async def strict(engine: AsyncEngine):
    async with TestClient(TestServer(create_app(engine, [MODEL], strict_request_fields=True))) as c:
        yield c


UNKNOWN = [
    (C, {"prompt": TEXT, "max_tokens": 2, "foo": 1, "top_logprobs": 2}, ["foo", "top_logprobs"]),
    (CHAT, {"messages": USER, "max_tokens": 2, "nvext": {"x": 1}, "verbosity": "low", "echo": True,
            "metadata": {"k": "v"}, "store": False}, ["nvext", "verbosity", "echo"]),
]


@pytest.mark.parametrize(("path", "body", "names"), UNKNOWN)
async def test_unknown_fields_ignored_with_log_and_header(client: TestClient, strict: TestClient, path: str,
                                                          body: dict[str, Any], names: list[str],
                                                          caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="api.protocol"):
        resp = await client.post(path, json=body)
    assert resp.status == 200
    assert resp.headers[IGNORED_FIELDS_HEADER] == ", ".join(names)
    assert all(n in caplog.text for n in names)
    stream = await client.post(path, json={**body, "stream": True})
    assert stream.status == 200 and stream.headers[IGNORED_FIELDS_HEADER] == ", ".join(names)
    await stream.read()
    status, err = await post(strict, path, body)  # --strict-request-fields: today's 400
    assert status == 400 and err["error"]["param"] == names[0] and err["error"]["code"] == "unknown_parameter"
    known = {k: v for k, v in body.items() if k not in names}
    resp = await client.post(path, json=known)
    assert resp.status == 200 and IGNORED_FIELDS_HEADER not in resp.headers


@pytest.mark.parametrize(("path", "body", "param"), [
    (CHAT, {"messages": USER, "max_completion_tokens": "5"}, "max_completion_tokens"),
    (C, {"prompt": TEXT, "prompt_logprobs": "2"}, "prompt_logprobs"),
    (C, {"prompt": TEXT, "prompt_logprobs": 21}, "prompt_logprobs"),
    (C, {"prompt": TEXT, "cache_salt": 5}, "cache_salt"),
    (CHAT, {"messages": USER, "cache_salt": "s" * 129}, "cache_salt"),
    (CHAT, {"messages": USER, "chat_template_kwargs": "x"}, "chat_template_kwargs"),
    (CHAT, {"messages": USER, "chat_template_kwargs": {"tools": []}}, "chat_template_kwargs"),
    (CHAT, {"messages": USER, "return_tokens_as_token_ids": "yes"}, "return_tokens_as_token_ids"),
    (CHAT, {"messages": USER, "tools": "get_weather"}, "tools"),
    (CHAT, {"messages": USER, "parallel_tool_calls": 1}, "parallel_tool_calls"),
    (CHAT, {"messages": [{"role": "assistant", "content": None, "tool_calls": "x"}]}, "messages[0].tool_calls"),
    (C, {"prompt": TEXT, "priority": 1}, "priority"),
    (CHAT, {"messages": USER, "chat_template": "{% for i in range(99999) %}{% for j in range(99999) %}"
                                               "{% endfor %}{% endfor %}"}, "chat_template"),
    # A call's arguments nested past Python's recursion limit are kept as their string (here far
    # over the context, so a 400 for the prompt), never a 500.
    (CHAT, {"messages": [USER[0], {"role": "assistant", "tool_calls": [{"id": "1", "type": "function", "function": {
        "name": "f", "arguments": "[" * 50_000 + "]" * 50_000}}]}]}, "prompt"),
])
async def test_wrong_types_of_known_fields_stay_400(client: TestClient, path: str, body: dict[str, Any],
                                                    param: str) -> None:
    status, err = await post(client, path, body)
    assert status == 400 and err["error"]["param"] == param, err


async def test_max_completion_tokens_stop_null_and_art_usage(client: TestClient) -> None:
    body = {"messages": USER, "max_completion_tokens": 5, "stop": None, "logprobs": True, "seed": 1,
            "return_token_ids": True}
    resp = await client.post(CHAT, json=body, headers={"X-Session-ID": "episode-1"})
    res = await resp.json()
    choice = res["choices"][0]
    # ART: usage.completion_tokens == len(token_ids) == len(logprobs)
    assert res["usage"]["completion_tokens"] == len(choice["token_ids"]) == len(choice["logprobs"]["content"]) == 5
    _, res = await post(client, C, {"prompt": TEXT, "max_completion_tokens": 3, "stop": None})
    assert res["usage"]["completion_tokens"] == 3


async def test_trl_completions_token_prompts_n_prompt_major(client: TestClient) -> None:
    """TRL's GRPO server mode: prompt as list[list[int]], n > 1, token ids and token_id logprob strings."""
    prompts = [[1, 40, 41, 42, 43], [1, 50, 51, 52]]
    body = {"model": MODEL, "prompt": prompts, "n": 3, "max_tokens": 4, "seed": 2, "logprobs": 1,
            "return_token_ids": True, "return_tokens_as_token_ids": True}
    status, res = await post(client, C, body)
    assert status == 200 and len(res["choices"]) == 6
    assert [c["index"] for c in res["choices"]] == list(range(6))
    assert [c["prompt_token_ids"] for c in res["choices"][::3]] == prompts  # prompt-major
    for c in res["choices"]:
        lp = c["logprobs"]
        assert [int(t.removeprefix("token_id:")) for t in lp["tokens"]] == c["token_ids"]
        for tok, x, top in zip(lp["tokens"], lp["token_logprobs"], lp["top_logprobs"]):
            assert all(k.startswith("token_id:") for k in top) and top[tok] == x


async def test_prompt_logprobs_vllm_shape_on_both_endpoints(client: TestClient, llama_dir: Path) -> None:
    _, tok = await post(client, "/tokenize", {"prompt": TEXT})
    ids = tok["tokens"]
    _, res = await post(client, C, {"prompt": ids, "max_tokens": 1, "prompt_logprobs": 1, "temperature": 0})
    plp = res["choices"][0]["prompt_logprobs"]  # completions: per choice
    with torch.no_grad():
        ref = load_hf(llama_dir)(torch.tensor([ids])).logits[0].float().log_softmax(-1)
    assert plp[0] is None and len(plp) == len(ids)
    got = torch.tensor([plp[i][str(ids[i])]["logprob"] for i in range(1, len(ids))])
    torch.testing.assert_close(got, ref[torch.arange(len(ids) - 1), torch.tensor(ids[1:])], atol=1e-5, rtol=0)
    assert all(any(v["rank"] == 1 for v in e.values()) for e in plp[1:])
    _, res = await post(client, CHAT, {"messages": USER, "max_tokens": 1, "prompt_logprobs": 0,
                                       "return_token_ids": True})
    plp = res["prompt_logprobs"]  # chat: top level
    assert "prompt_logprobs" not in res["choices"][0] and len(plp) == len(res["prompt_token_ids"])
    assert all(len(e) == 1 for e in plp[1:])


async def test_chat_template_kwargs_reach_the_template(client: TestClient, engine: AsyncEngine) -> None:
    tok = engine.tokenizer
    tok.chat_template = CHATML + "{% if enable_thinking %}<think>{% endif %}"
    try:
        body = {"messages": USER, "max_tokens": 1, "return_token_ids": True}
        _, plain = await post(client, CHAT, body)
        _, think = await post(client, CHAT, {**body, "chat_template_kwargs": {"enable_thinking": True}})
    finally:
        tok.chat_template = CHATML
    assert not tok.decode(plain["prompt_token_ids"]).endswith("<think>")
    assert tok.decode(think["prompt_token_ids"]).endswith("assistant\n<think>")


async def test_cache_salt_on_chat(client: TestClient, engine: AsyncEngine) -> None:
    msgs = [{"role": "user", "content": TEXT * 2}]

    async def cached(salt: str) -> int:
        _, res = await post(client, CHAT, {"messages": msgs, "max_tokens": 1, "cache_salt": salt})
        return int(res["usage"]["prompt_tokens_details"]["cached_tokens"])

    await engine.reset_prefix_cache()
    assert (await cached("a"), await cached("a") > 0, await cached("b")) == (0, True, 0)


async def test_openai_package_extra_fields_and_include_usage(client: TestClient) -> None:
    oai = openai.AsyncOpenAI(base_url=str(client.make_url("/v1")), api_key="unused", max_retries=0)
    raw = await oai.chat.completions.with_raw_response.create(
        model=MODEL, messages=USER, max_completion_tokens=3, metadata={"run": "1"}, store=False,
        extra_body={"nvext": {"priority": 1}, "verbosity": "low"})
    assert raw.headers[IGNORED_FIELDS_HEADER] == "nvext, verbosity"
    assert raw.parse().usage.completion_tokens == 3
    chunks = [c async for c in await oai.chat.completions.create(
        model=MODEL, messages=USER, max_tokens=4, stream=True, stream_options={"include_usage": True})]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 4
    assert all(c.usage is None for c in chunks[:-1])


def test_serve_flags() -> None:
    from asyncengine.cli import build_parser

    args = build_parser().parse_args(["serve", "--tool-call-parser", "hermes", "--strict-request-fields"])
    assert args.tool_call_parser == "hermes" and args.strict_request_fields
    args = build_parser().parse_args(["serve"])
    assert args.tool_call_parser is None and not args.strict_request_fields
    with pytest.raises(SystemExit):  # only registered parsers
        build_parser().parse_args(["serve", "--tool-call-parser", "nope"])


async def test_echo_with_larger_prompt_logprobs_keeps_each_shape(client: TestClient) -> None:
    _, res = await post(client, C, {"prompt": TEXT, "max_tokens": 1, "echo": True, "logprobs": 1,
                                    "prompt_logprobs": 3, "temperature": 0})
    choice = res["choices"][0]
    assert all(len(t) <= 2 for t in choice["logprobs"]["top_logprobs"][1:])  # top-1 plus the actual token
    assert all(sum(v["rank"] <= 3 for v in e.values()) == 3 for e in choice["prompt_logprobs"][1:])


async def test_ignored_names_cannot_break_the_header(client: TestClient) -> None:
    body: dict[str, Any] = {"prompt": TEXT, "max_tokens": 1, "evil\r\nSet-Cookie: x": 1, "é" * 100: 2}
    body.update({f"f{i}": i for i in range(30)})
    resp = await client.post(C, json=body)
    assert resp.status == 200 and "Set-Cookie" not in resp.headers
    names = resp.headers[IGNORED_FIELDS_HEADER]
    assert names.startswith("evil??Set-Cookie: x, " + "?" * 64 + ", f0, f1") and names.endswith("... (16 more)")
