"""Structured outputs over HTTP: response_format, structured_outputs and guided_* on both
OpenAI endpoints; bad schemas and patterns are 400s naming the field; nothing leaks."""
from __future__ import annotations

import json
import re
from typing import Any

import jsonschema
import pytest
from aiohttp.test_utils import TestClient

from asyncengine.async_engine import AsyncEngine
from tests.test_server import client, engine, post, stream_events, wait_idle  # noqa: F401 (fixtures)
from tests.test_structured import CHOICES, EMAIL, SCHEMA

C, CHAT = "/v1/completions", "/v1/chat/completions"
USER = [{"role": "user", "content": "Give me JSON"}]
FORMAT = {"type": "json_schema", "json_schema": {"name": "verdict", "schema": SCHEMA, "strict": True}}


def _content(body: dict[str, Any], chat: bool) -> list[tuple[str, str]]:
    return [((c["message"]["content"] if chat else c["text"]), c["finish_reason"]) for c in body["choices"]]


async def test_chat_response_format_json_schema(client: TestClient) -> None:
    body = {"messages": USER, "response_format": FORMAT, "n": 6, "seed": 5, "max_tokens": 200,
            "structured_outputs": None}
    status, resp = await post(client, CHAT, body)
    assert status == 200, resp
    # Whitespace is free here (OpenAI has no switch for it): a random model may spend its
    # tokens on it, so an output either completes and validates or is cut by max_tokens.
    for text, reason in _content(resp, True):
        assert text.startswith("{"), text
        if reason == "stop":
            jsonschema.validate(json.loads(text), SCHEMA)
        else:
            assert reason == "length"


async def test_completions_disable_any_whitespace_and_stream(client: TestClient) -> None:
    body = {"prompt": "JSON:", "structured_outputs": {"json": SCHEMA, "disable_any_whitespace": True}, "n": 4,
            "seed": 1, "max_tokens": 200, "logprobs": 2}
    status, full = await post(client, C, body)
    assert status == 200, full
    for text, reason in _content(full, False):
        assert reason == "stop"
        jsonschema.validate(json.loads(text), SCHEMA)
    events = await stream_events(client, C, body)
    streamed: dict[int, str] = {}
    for ev in events:
        for c in ev["choices"]:
            streamed[c["index"]] = streamed.get(c["index"], "") + c["text"]
    assert [streamed[i] for i in range(4)] == [t for t, _ in _content(full, False)]


@pytest.mark.parametrize(("path", "fields"), [
    (C, {"structured_outputs": {"regex": EMAIL}}), (C, {"guided_regex": EMAIL}),
    (CHAT, {"structured_outputs": {"regex": EMAIL}}), (CHAT, {"guided_regex": EMAIL, "guided_decoding_backend": "xgrammar"}),
])
async def test_regex(client: TestClient, path: str, fields: dict[str, Any]) -> None:
    base = {"messages": USER} if path == CHAT else {"prompt": "mail:"}
    status, resp = await post(client, path, {**base, **fields, "n": 4, "seed": 2, "max_tokens": 60})
    assert status == 200, resp
    for text, reason in _content(resp, path == CHAT):
        assert reason == "stop" and re.fullmatch(EMAIL, text), text


async def test_choice_grammar_and_json_object(client: TestClient) -> None:
    for fields in ({"guided_choice": CHOICES}, {"structured_outputs": {"choice": CHOICES}}):
        status, resp = await post(client, C, {"prompt": "pick", **fields, "n": 5, "seed": 3, "max_tokens": 20})
        assert status == 200 and all(t in CHOICES and r == "stop" for t, r in _content(resp, False)), resp
    grammar = 'root ::= "A" | "B" [0-9]'
    for fields in ({"guided_grammar": grammar}, {"structured_outputs": {"grammar": grammar}}):
        status, resp = await post(client, C, {"prompt": "g", **fields, "n": 5, "seed": 4, "max_tokens": 20})
        assert status == 200 and all(re.fullmatch("A|B[0-9]", t) for t, _ in _content(resp, False)), resp
    status, resp = await post(client, CHAT, {"messages": USER, "response_format": {"type": "json_object"},
                                             "structured_outputs": None, "seed": 1, "max_tokens": 100, "n": 3})
    assert status == 200
    for text, reason in _content(resp, True):
        assert text.lstrip().startswith("{") and (reason == "length" or isinstance(json.loads(text), dict))


async def test_n_choices_compile_their_spec_once(client: TestClient, engine: AsyncEngine) -> None:
    before = engine.core.structured.backend.num_compiles
    status, resp = await post(client, C, {"prompt": "id", "guided_regex": "id-[0-9]{4}", "n": 6, "max_tokens": 12})
    assert status == 200 and all(re.fullmatch("id-[0-9]{4}", t) for t, _ in _content(resp, False)), resp
    assert engine.core.structured.backend.num_compiles == before + 1


async def test_max_tokens_too_short_is_length(client: TestClient) -> None:
    status, resp = await post(client, C, {"prompt": "a", "guided_regex": "a{200}", "max_tokens": 5})
    assert status == 200 and resp["choices"][0]["finish_reason"] == "length"


# (path, extra fields, param named in the 400)
BAD: list[tuple[str, dict[str, Any], str]] = [
    (CHAT, {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}}},
     "response_format.json_schema.schema"),
    (CHAT, {"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format.json_schema"),
    (CHAT, {"response_format": {"type": "yaml"}}, "response_format"),
    (C, {"structured_outputs": {"regex": "(unclosed"}}, "structured_outputs.regex"),
    (C, {"structured_outputs": {"regex": "a", "choice": ["b"]}}, "structured_outputs.choice"),
    (C, {"structured_outputs": {"json": "{not json"}}, "structured_outputs.json"),
    (C, {"structured_outputs": {"choice": []}}, "structured_outputs.choice"),
    (C, {"structured_outputs": {"grammar": "root ::= undefined"}}, "structured_outputs.grammar"),
    (C, {"structured_outputs": {"whitespace_pattern": " "}}, "structured_outputs.whitespace_pattern"),
    (C, {"structured_outputs": {"json_object": "yes"}}, "structured_outputs.json_object"),
    (C, {"guided_json": {"type": "object", "properties": {"a": {"$ref": "#/nowhere"}}}}, "guided_json"),
    (C, {"guided_json": 5}, "guided_json"),
    (C, {"guided_regex": "[b-a]"}, "guided_regex"),
    (C, {"guided_choice": [1, 2]}, "guided_choice"),
    (C, {"guided_regex": "a", "guided_choice": ["a"]}, "guided_choice"),
    (C, {"guided_regex": "a", "structured_outputs": {"regex": "b"}}, "guided_regex"),
    (C, {"guided_regex": 5}, "guided_regex"),
    (C, {"guided_decoding_backend": "outlines", "guided_regex": "a"}, "guided_decoding_backend"),
    (C, {"guided_whitespace_pattern": " ", "guided_json": {}}, "guided_whitespace_pattern"),
]


@pytest.mark.parametrize(("path", "fields", "param"), BAD)
async def test_bad_structured_requests_are_400(client: TestClient, engine: AsyncEngine, path: str,
                                               fields: dict[str, Any], param: str) -> None:
    base = {"messages": USER} if path == CHAT else {"prompt": "x"}
    status, resp = await post(client, path, {**base, **fields, "max_tokens": 4, "n": 2})
    assert status == 400, resp
    assert resp["error"]["type"] == "invalid_request_error" and resp["error"]["param"] == param, resp
    s = await wait_idle(engine)
    assert engine.is_healthy and s["num_free_blocks"] == s["num_total_blocks"]
