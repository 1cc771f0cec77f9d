"""Tool calling without a server: the hermes parser, the streamer, the fallback rendering, validation."""
from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import jinja2
import pytest

from api.protocol import APIError
from api.tools import ToolStreamer, get_parser, merge_tool_call_deltas, parse_tool_request, render_messages
from api.tools.render import fallback_messages

CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
CITY = {"type": "object", "properties": {"city": {"type": "string"}}}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather of a city", "strict": True,
                                           "parameters": CITY}}]
# SmolLM2-135M-Instruct's template, verbatim: no tool support, and `+ message['content']` fails on null.
SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\n"
    "You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# A template with native tool support, in the style of Qwen2.5's (tools in the system turn).
NATIVE_TEMPLATE = (
    "{% if tools %}<|im_start|>system\nTOOLS:{% for t in tools %}{{ t['function']['name'] }};{% endfor %}<|im_end|>\n"
    "{% endif %}{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
    "{% for c in m.get('tool_calls', []) %}<tool_call>{{ c['function']['name'] }}:"
    "{{ c['function']['arguments'] | tojson }}</tool_call>{% endfor %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
HISTORY: list[dict[str, Any]] = [
    {"role": "user", "content": "Weather in Paris and Rome?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}},
        {"id": "call_2", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Rome"}}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "18C"},
    {"role": "tool", "tool_call_id": "call_2", "content": "25C"},
]


def extract(text: str) -> tuple[str | None, list[dict[str, Any]]]:
    """The full-response view: one feed of the whole text."""
    s = ToolStreamer(get_parser("hermes"))
    content, deltas = s.feed(text)
    content += s.finish()
    calls = merge_tool_call_deltas(deltas)
    return (content or None) if calls else content, calls


def stream(text: str, cuts: list[int]) -> tuple[str | None, list[dict[str, Any]]]:
    s = ToolStreamer(get_parser("hermes"))
    content, deltas = "", []
    for a, b in zip([0, *cuts], [*cuts, len(text)]):
        c, d = s.feed(text[a:b])
        content += c
        deltas += d
    content += s.finish()
    calls = merge_tool_call_deltas(deltas)
    return (content or None) if calls else content, calls


def test_valid_call_with_text_before() -> None:
    content, calls = extract("Let me check.\n" + CALL)
    assert content == "Let me check.\n"
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == [
        ("get_weather", {"city": "Paris"})]
    assert calls[0]["id"].startswith("call_") and calls[0]["type"] == "function"


def test_only_calls_give_null_content_and_two_calls_keep_order() -> None:
    content, calls = extract(CALL + "\n" + CALL.replace("Paris", "Rome") + "\n")
    assert content is None
    assert [json.loads(c["function"]["arguments"])["city"] for c in calls] == ["Paris", "Rome"]
    assert calls[0]["id"] != calls[1]["id"]


@pytest.mark.parametrize("text", [
    '<tool_call>\n{"name": "get_weather", "arguments": {"city": }\n</tool_call>',  # bad JSON
    '<tool_call>{"arguments": {"city": "Paris"}}</tool_call>',  # no name
    '<tool_call>{"name": "f", "arguments": [1, 2]}</tool_call>',  # arguments not an object
    '<tool_call>{"name": "f", "arguments": "not json"}</tool_call>',
    'Sure: <tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}',  # cut off before the end
    "a <tool_ca",  # a marker start that never completes
    '<tool_call>{"name": "f", "arguments": ' + "[" * 100_000 + "</tool_call>",  # nesting past the recursion limit
])
def test_invalid_call_stays_content_verbatim(text: str) -> None:
    assert extract(text) == (text, [])


def test_arguments_given_as_json_string() -> None:
    _, calls = extract('<tool_call>{"name": "f", "arguments": "{\\"x\\": 1}"}</tool_call>')
    assert json.loads(calls[0]["function"]["arguments"]) == {"x": 1}


def test_invalid_block_between_valid_ones() -> None:
    bad = "<tool_call>{oops}</tool_call>"
    content, calls = extract(CALL + bad + CALL)
    assert content == bad and len(calls) == 2


@pytest.mark.parametrize("text", [
    "Let me check.\n" + CALL, CALL + "\n" + CALL, "plain text, no calls at all <tool",
    "x <tool_call>{oops}</tool_call> y",
    " \n" + CALL + " done", "<<tool_call>" + CALL[len("<tool_call>"):],
])
def test_stream_equals_full_for_every_split(text: str) -> None:
    want_content, want_calls = extract(text)
    strip = [{**c, "id": None} for c in want_calls]
    for cut in range(len(text) + 1):  # every single split point
        content, calls = stream(text, [cut])
        assert (content, [{**c, "id": None} for c in calls]) == (want_content, strip), cut
    rng = random.Random(0)
    for _ in range(50):  # random multi-way splits
        cuts = sorted(rng.sample(range(1, len(text)), k=min(len(text) - 1, rng.randint(1, 12))))
        content, calls = stream(text, cuts)
        assert (content, [{**c, "id": None} for c in calls]) == (want_content, strip), cuts


def test_streamed_call_sends_id_and_name_first_then_arguments() -> None:
    s = ToolStreamer(get_parser("hermes"))
    assert s.feed(CALL[:20]) == ("", [])  # held: a call is decided only at its end marker
    content, deltas = s.feed(CALL[20:])
    assert content == ""
    head, args = deltas
    assert head["index"] == 0 and head["id"].startswith("call_") and head["function"] == {
        "name": "get_weather", "arguments": ""}
    assert "id" not in args and json.loads(args["function"]["arguments"]) == {"city": "Paris"}


def test_fallback_rendering_of_tools_calls_and_results(tiny_tokenizer: Any) -> None:
    tiny_tokenizer.chat_template = SMOLLM2_TEMPLATE
    with pytest.raises((TypeError, jinja2.exceptions.UndefinedError)):  # the template alone fails on null content
        tiny_tokenizer.apply_chat_template(HISTORY, tokenize=False)
    msgs = [{**m, "content": m["content"] or ""} for m in HISTORY]
    text = render_messages(msgs, TOOLS, tiny_tokenizer, True, {})
    system, user, assistant, results = text.split("<|im_end|>\n")[:4]
    assert system.startswith("<|im_start|>system\n# Tools") and json.dumps(TOOLS[0]) in system
    assert assistant == ('<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}'
                         '\n</tool_call>\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome"}}'
                         "\n</tool_call>")
    # Both results in one user turn, in order.
    assert results == "<|im_start|>user\n<tool_response>\n18C\n</tool_response>\n<tool_response>\n25C\n</tool_response>"
    assert text.endswith("<|im_start|>assistant\n")


def test_fallback_appends_tools_to_an_existing_system_message() -> None:
    out = fallback_messages([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}], TOOLS)
    assert len(out) == 2 and out[0]["content"].startswith("Be brief.\n\n# Tools")
    assert fallback_messages([{"role": "user", "content": "hi"}], []) == [{"role": "user", "content": "hi"}]


def test_native_template_gets_tools_and_calls(tiny_tokenizer: Any) -> None:
    tiny_tokenizer.chat_template = NATIVE_TEMPLATE
    msgs = [{**m, "content": m["content"] or ""} for m in HISTORY]
    text = render_messages(msgs, TOOLS, tiny_tokenizer, True, {})
    assert text.startswith("<|im_start|>system\nTOOLS:get_weather;")
    assert '<tool_call>get_weather:{"city": "Paris"}</tool_call>' in text
    assert "<|im_start|>tool\n18C" in text and "# Tools" not in text


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_weather"}}])
def test_forced_tool_choice_is_a_grammar_and_is_parsed(choice: Any) -> None:
    req = parse_tool_request({"tools": TOOLS, "tool_choice": choice})
    assert req.forced is not None and req.forced.kind == "structural_tag" and req.forced.param == "tool_choice"
    assert req.parse_calls and req.choice == ("required" if choice == "required" else "function")
    assert parse_tool_request({"tools": TOOLS}).forced is None


@pytest.mark.parametrize(("body", "param"), [
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "not_a_tool"}}}, "tool_choice"),
    ({"tools": [], "tool_choice": "required"}, "tool_choice"),
    ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice"),
    ({"tools": [{"type": "retrieval"}]}, "tools[0]"),
    ({"tools": [{"type": "function", "function": {"name": ""}}]}, "tools[0].function"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": "x"}}]}, "tools[0].function.parameters"),
    ({"tools": [TOOLS[0], TOOLS[0]]}, "tools"),
    ({"functions": [{"name": "f"}]}, "functions"),
])
def test_bad_tool_fields_are_400(body: dict[str, Any], param: str) -> None:
    with pytest.raises(APIError) as err:
        parse_tool_request(body)
    assert err.value.status == 400 and err.value.param == param


def test_tool_choice_defaults() -> None:
    assert parse_tool_request({"tools": TOOLS}).parse_calls
    assert not parse_tool_request({"tools": TOOLS, "tool_choice": "none"}).parse_calls
    assert not parse_tool_request({}).parse_calls


@pytest.fixture
def tiny_tokenizer(llama_dir: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(llama_dir))
