"""tool_choice "required" and a named function, forced by the grammar (structured outputs):
the calls come back through the same parser as free ones, their arguments valid under the
function's parameter schema, streamed equal to not; structured outputs on the token-in /
token-out endpoint; bad combinations 400."""
from __future__ import annotations

import json
import re
from typing import Any

import jsonschema
import pytest
from aiohttp.test_utils import TestClient

from aiohttp.test_utils import TestServer

from api.server import create_app
from tests.test_server import MODEL, make_engine, post, stream_events
from tests.tiny_models import make_model_dir

ADD = {"type": "function", "function": {"name": "add", "parameters": {
    "type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 99},
                                      "b": {"type": "integer", "minimum": 0, "maximum": 99}},
    "required": ["a", "b"], "additionalProperties": False}}}
MOOD = {"type": "function", "function": {"name": "mood", "parameters": {
    "type": "object", "properties": {"m": {"enum": ["up", "down"]}}, "required": ["m"],
    "additionalProperties": False}}}
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in (ADD, MOOD)}
USER = [{"role": "user", "content": "Add 2 and 3."}]


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory):
    # Tool definitions rendered into the system prompt take ~770 tokens of the tiny tokenizer.
    model = make_model_dir(tmp_path_factory.mktemp("long") / "llama", "llama", max_position_embeddings=2048)
    eng = make_engine(model, max_model_len=2048, num_kv_blocks=512)
    yield eng
    eng.shutdown()


@pytest.fixture
async def client(engine):
    async with TestClient(TestServer(create_app(engine, [MODEL]))) as c:
        yield c


def _chat(choice: Any, seed: int, **kw: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": USER, "tools": [ADD, MOOD], "tool_choice": choice,
            "max_tokens": 120, "temperature": 1.0, "seed": seed, **kw}


def _check_calls(calls: list[dict[str, Any]], names: set[str]) -> None:
    assert calls, "a forced call must come back as tool_calls"
    for call in calls:
        fn = call["function"]
        assert fn["name"] in names
        jsonschema.validate(json.loads(fn["arguments"]), SCHEMAS[fn["name"]])


@pytest.mark.parametrize("seed", range(4))
async def test_required_forces_one_valid_call(client: TestClient, seed: int) -> None:
    status, body = await post(client, "/v1/chat/completions", _chat("required", seed, parallel_tool_calls=False))
    assert status == 200, body
    choice = body["choices"][0]
    assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] is None, choice
    assert len(choice["message"]["tool_calls"]) == 1
    _check_calls(choice["message"]["tool_calls"], {"add", "mood"})


async def test_required_parallel_calls_are_each_valid(client: TestClient) -> None:
    """With parallel calls the grammar lets a call follow a call; a random model may go on
    until max_tokens, and every call it closed is still returned and valid."""
    for seed in range(3):
        status, body = await post(client, "/v1/chat/completions", _chat("required", seed, max_tokens=60))
        assert status == 200, body
        choice = body["choices"][0]
        assert choice["finish_reason"] in ("tool_calls", "length")
        if choice["finish_reason"] == "tool_calls":
            _check_calls(choice["message"]["tool_calls"], {"add", "mood"})
        else:
            for call in choice["message"].get("tool_calls") or []:
                _check_calls([call], {"add", "mood"})


@pytest.mark.parametrize("seed", range(4))
async def test_a_named_function_is_the_one_called(client: TestClient, seed: int) -> None:
    named = {"type": "function", "function": {"name": "mood"}}
    status, body = await post(client, "/v1/chat/completions", _chat(named, seed))
    assert status == 200, body
    choice = body["choices"][0]
    assert choice["finish_reason"] == "tool_calls", choice
    assert len(choice["message"]["tool_calls"]) == 1
    _check_calls(choice["message"]["tool_calls"], {"mood"})
    events = await stream_events(client, "/v1/chat/completions", _chat(named, seed))
    deltas = [d for e in events if e.get("choices") for d in e["choices"][0]["delta"].get("tool_calls", [])]
    assert deltas[0]["function"]["name"] == "mood"
    streamed = "".join(d["function"].get("arguments", "") for d in deltas)
    assert streamed == choice["message"]["tool_calls"][0]["function"]["arguments"], "streamed = full"


async def test_a_forced_call_through_the_openai_package(client: TestClient) -> None:
    import openai

    oai = openai.AsyncOpenAI(base_url=str(client.make_url("/v1")), api_key="unused", max_retries=0)
    res = await oai.chat.completions.create(
        model=MODEL, messages=USER, tools=[ADD, MOOD], max_tokens=120, seed=3,
        tool_choice={"type": "function", "function": {"name": "add"}})
    msg = res.choices[0].message
    assert res.choices[0].finish_reason == "tool_calls" and msg.content is None
    assert [c.function.name for c in msg.tool_calls] == ["add"]
    jsonschema.validate(json.loads(msg.tool_calls[0].function.arguments), SCHEMAS["add"])
    await oai.close()


async def test_forced_calls_that_cannot_be(client: TestClient) -> None:
    bad = [
        {**_chat({"type": "function", "function": {"name": "nope"}}, 0)},
        {**_chat("required", 0), "tools": []},
        {**_chat("required", 0), "response_format": {"type": "json_object"}},
        {**_chat({"type": "function"}, 0)},
    ]
    for b in bad:
        status, body = await post(client, "/v1/chat/completions", b)
        assert status == 400 and body["error"]["param"] == "tool_choice", (b, body)


async def test_structured_outputs_on_the_token_in_token_out_endpoint(client: TestClient) -> None:
    for seed in range(4):
        body = {"token_ids": [5, 6, 7, 8], "sampling_params": {
            "max_tokens": 12, "temperature": 1.0, "seed": seed, "structured_outputs": {"regex": "(yes|no)[0-9]{2}"}}}
        status, out = await post(client, "/inference/v1/generate", body)
        assert status == 200, out
        ids = out["choices"][0]["token_ids"]
        assert out["choices"][0]["finish_reason"] == "stop" and ids[-1] == 2, "ends where the grammar ends, on EOS"
        _, text = await post(client, "/detokenize", {"tokens": ids[:-1]})
        assert re.fullmatch(r"(yes|no)[0-9]{2}", text["prompt"]), text
    status, out = await post(client, "/inference/v1/generate", {
        "token_ids": [5], "sampling_params": {"structured_outputs": {"regex": "("}}})
    assert status == 400
