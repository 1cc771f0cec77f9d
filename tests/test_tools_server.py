"""Tool calls over HTTP through the official `openai` package, streamed and not.

A tiny random model cannot be made to write a tool call, so the calls' text comes from a
scripted engine: the real server, parser and SSE code, with the sampled tokens fixed (the
tokens of a given reply, one per delta). History with tool calls and tool results runs on the
real engine.
"""
from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import openai
import pytest
from aiohttp.test_utils import TestClient, TestServer

from api.server import create_app
from asyncengine.async_engine import AsyncEngine, RequestStream
from asyncengine.outputs import RequestOutput
from tests.test_server import MODEL, make_engine, wait_idle
from tests.test_tools import CALL, HISTORY, TOOLS
from tests.tiny_models import make_model_dir

USER = [{"role": "user", "content": "Weather in Paris?"}]


class ScriptedStream(RequestStream):
    """A RequestStream whose tokens are the reply's, one per delta (finish_reason "stop")."""

    def __init__(self, tokenizer: Any, reply: str, request_id: str) -> None:  # no engine behind it
        self.ids = list(tokenizer.encode(reply, add_special_tokens=False))
        self.tokenizer = tokenizer
        self.request_id = request_id

    def __aiter__(self) -> AsyncIterator[RequestOutput]:
        return self._replay()

    async def _replay(self) -> AsyncIterator[RequestOutput]:
        prev = ""
        for i in range(len(self.ids)):
            text = self.tokenizer.decode(self.ids[: i + 1])
            last = i == len(self.ids) - 1
            yield RequestOutput(self.request_id, [self.ids[i]], [-0.5], [0], text=text[len(prev):], finished=last,
                                finish_reason="stop" if last else None, num_output_tokens=i + 1)
            prev = text

    def abort(self) -> None:
        pass


class ScriptedEngine:
    """The real engine's tokenizer and limits; add_request answers with the scripted reply."""

    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine
        self.reply = ""
        self.prompts: list[list[int]] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)

    async def add_request(self, prompt: list[int], params: Any, request_id: str | None = None) -> ScriptedStream:
        self.prompts.append(list(prompt))
        return ScriptedStream(self._engine.tokenizer, self.reply, request_id or "r")


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory):
    # A longer context than the shared tiny model's: the tools listing is long in tiny-BPE tokens.
    model_dir = make_model_dir(tmp_path_factory.mktemp("tools") / "llama", "llama", max_position_embeddings=2048)
    eng = make_engine(model_dir, max_model_len=2048, num_kv_blocks=512)
    yield eng
    eng.shutdown()


@pytest.fixture
async def scripted(engine: AsyncEngine):
    fake = ScriptedEngine(engine)
    async with TestClient(TestServer(create_app(fake, [MODEL]))) as c:  # type: ignore[arg-type]
        yield fake, openai.AsyncOpenAI(base_url=str(c.make_url("/v1")), api_key="unused", max_retries=0)


@pytest.fixture
async def real(engine: AsyncEngine):
    async with TestClient(TestServer(create_app(engine, [MODEL]))) as c:
        yield openai.AsyncOpenAI(base_url=str(c.make_url("/v1")), api_key="unused", max_retries=0)


async def _streamed(oai: openai.AsyncOpenAI, **kw: Any) -> tuple[str | None, list[dict[str, Any]], str, list[Any]]:
    """Content, tool calls and finish reason accumulated from a stream, and its chunks."""
    chunks = [c async for c in await oai.chat.completions.create(stream=True, **kw)]
    content: str | None = None
    calls: dict[int, dict[str, Any]] = {}
    finish = ""
    for ch in chunks:
        for c in ch.choices:
            if c.delta.content:
                content = (content or "") + c.delta.content
            for d in c.delta.tool_calls or []:
                call = calls.setdefault(d.index, {"id": d.id, "name": d.function.name, "arguments": ""})
                call["arguments"] += d.function.arguments or ""
            finish = c.finish_reason or finish
    return content, [calls[i] for i in sorted(calls)], finish, chunks


async def test_tool_call_round_trip_not_streamed(scripted: Any) -> None:
    fake, oai = scripted
    fake.reply = "Let me check.\n" + CALL
    res = await oai.chat.completions.create(model=MODEL, messages=USER, tools=TOOLS,
                                            extra_body={"return_token_ids": True})
    (choice,) = res.choices
    assert choice.finish_reason == "tool_calls" and choice.message.content == "Let me check.\n"
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_") and call.function.name == "get_weather"
    assert isinstance(call.function.arguments, str) and json.loads(call.function.arguments) == {"city": "Paris"}
    # The raw sampled tokens whatever the parser made of them; ART's usage invariant.
    ids = choice.model_extra["token_ids"]
    assert ids == fake._engine.tokenizer.encode(fake.reply, add_special_tokens=False)
    assert res.usage.completion_tokens == len(ids)
    # The tools reached the prompt through the fallback rendering (the tiny template has none).
    prompt = fake._engine.tokenizer.decode(fake.prompts[-1])
    assert "<tools>" in prompt and '"name": "get_weather"' in prompt


async def test_tool_call_streamed_equals_not_streamed(scripted: Any) -> None:
    fake, oai = scripted
    fake.reply = CALL + "\n" + CALL.replace("Paris", "Rome")
    content, calls, finish, chunks = await _streamed(
        oai, model=MODEL, messages=USER, tools=TOOLS, stream_options={"include_usage": True})
    assert finish == "tool_calls" and content is None
    assert [json.loads(c["arguments"]) for c in calls] == [{"city": "Paris"}, {"city": "Rome"}]
    # Per call: id and name come first (with empty arguments), then the argument fragments.
    firsts = [d for ch in chunks for c in ch.choices for d in (c.delta.tool_calls or []) if d.id]
    assert [(d.index, d.function.name, d.function.arguments) for d in firsts] == [
        (0, "get_weather", ""), (1, "get_weather", "")]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(
        fake._engine.tokenizer.encode(fake.reply, add_special_tokens=False))
    full = (await oai.chat.completions.create(model=MODEL, messages=USER, tools=TOOLS)).choices[0]
    assert full.message.content is None and full.finish_reason == finish
    assert [(c.function.name, c.function.arguments) for c in full.message.tool_calls] == [
        (c["name"], c["arguments"]) for c in calls]


@pytest.mark.parametrize("stream", [False, True])
async def test_invalid_tool_json_stays_content(scripted: Any, stream: bool) -> None:
    fake, oai = scripted
    fake.reply = 'Calling: <tool_call>{"name": "get_weather", "arguments": {"city": }}</tool_call>'
    if stream:
        content, calls, finish, _ = await _streamed(oai, model=MODEL, messages=USER, tools=TOOLS)
    else:
        choice = (await oai.chat.completions.create(model=MODEL, messages=USER, tools=TOOLS)).choices[0]
        content, calls, finish = choice.message.content, choice.message.tool_calls or [], choice.finish_reason
    assert (content, calls, finish) == (fake.reply, [], "stop")


async def test_tool_choice_none_keeps_calls_as_content(scripted: Any) -> None:
    fake, oai = scripted
    fake.reply = CALL
    choice = (await oai.chat.completions.create(model=MODEL, messages=USER, tools=TOOLS, tool_choice="none")).choices[0]
    assert choice.message.content == CALL and not choice.message.tool_calls and choice.finish_reason == "stop"


@pytest.mark.parametrize("stream", [False, True])
async def test_history_with_tool_calls_and_tool_messages(real: openai.AsyncOpenAI, engine: AsyncEngine,
                                                         stream: bool) -> None:
    """openai-agents' shape of a second turn: assistant content null + tool_calls, then tool results."""
    def as_openai(c: dict[str, Any]) -> dict[str, Any]:  # arguments as the JSON string OpenAI sends
        return {**c, "function": {**c["function"], "arguments": json.dumps(c["function"]["arguments"])}}

    history = [{**m, "tool_calls": [as_openai(c) for c in m["tool_calls"]]} if m.get("tool_calls") else m
               for m in HISTORY]
    kw: dict[str, Any] = dict(model=MODEL, messages=history, tools=TOOLS, max_tokens=5, seed=3, temperature=0,
                              extra_body={"return_token_ids": True})
    if stream:
        chunks = [c async for c in await real.chat.completions.create(stream=True, **kw)]
        prompt_ids = chunks[0].model_extra["prompt_token_ids"]
        assert sum(len(c.choices[0].model_extra.get("token_ids", [])) for c in chunks if c.choices) == 5
    else:
        res = await real.chat.completions.create(**kw)
        prompt_ids = res.model_extra["prompt_token_ids"]
        assert res.usage.completion_tokens == 5 == len(res.choices[0].model_extra["token_ids"])
    text = engine.tokenizer.decode(prompt_ids)
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome"}}\n</tool_call>' in text
    assert "<|im_start|>user\n<tool_response>\n18C\n</tool_response>\n<tool_response>\n25C" in text
    await wait_idle(engine)
