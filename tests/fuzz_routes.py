"""Schema-aware request strategies for every HTTP endpoint, in one route table.

Bodies are drawn from the endpoints' own field tables (api/protocol.py): mostly
well-typed values near the valid ranges, some of the wrong type, unknown fields, and raw
garbage. To fuzz a new endpoint, add a Route to ROUTES (with a body strategy and, for a
route that changes engine state, an `undo` request sent after each example).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hypothesis import strategies as st

from api.protocol import CHAT_FIELDS, COMPLETION_FIELDS
from api.tito import _SAMPLING_FIELDS as TITO_SAMPLING_FIELDS

VOCAB = 384
MODEL = "tiny"
ADMIN_KEY = "fuzz-admin"

json_scalars = st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False) | st.text(max_size=8)
json_values = st.recursive(json_scalars, lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=6), c,
                                                                                                  max_size=3),
                           max_leaves=8)
token_ids = st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=12)
bad_token_ids = st.lists(st.integers(-3, VOCAB + 3) | st.booleans() | st.floats(0, 10), max_size=5)
texts = st.text(max_size=40) | st.sampled_from(["The quick brown fox", "Hello world!", "café 東京 😀", "<|im_end|>"])

# Typed values near the valid ranges for each field kind of api/protocol.py.
_BY_KIND: dict[str, st.SearchStrategy[Any]] = {
    "int": st.integers(-2, 25) | st.sampled_from([2**31, -(2**63), 2**64, 10**6]),
    "number": st.floats(-3, 3, allow_nan=False) | st.sampled_from([0, 1, 1e308, -1e308, 2.0]),
    "bool": st.booleans(),
    "str": st.text(max_size=12) | st.sampled_from(["raw", "processed", MODEL, "auto"]),
    "object": st.dictionaries(st.sampled_from(["include_usage", "continuous_usage_stats", "type", "x"]),
                              st.booleans() | st.text(max_size=6), max_size=2),
    "list": st.lists(json_scalars, max_size=3),
    "int_list": st.lists(st.integers(-1, VOCAB + 2), max_size=4),
    "stop": st.text(max_size=4) | st.lists(st.text(max_size=4), max_size=4) | json_scalars,
    "any": json_values,
}
# Fields whose useful values are narrower than their kind (kept small: every example runs).
_SPECIAL: dict[str, st.SearchStrategy[Any]] = {
    "max_tokens": st.integers(0, 6) | st.sampled_from([-1, 10**6, 2**63]),
    "max_completion_tokens": st.integers(0, 6) | st.sampled_from([-1, 10**6]),
    "n": st.integers(1, 3) | st.sampled_from([0, -1, 129, 10**9]),
    "best_of": st.integers(1, 3) | st.sampled_from([0, 5]),
    "model": st.sampled_from([MODEL, MODEL, "other"]) | st.text(max_size=5),
    "logprobs": st.integers(0, 5) | st.booleans() | st.sampled_from([20, 21, -1]),
    "top_logprobs": st.integers(0, 5) | st.sampled_from([20, 21, -1]),
    "prompt_logprobs": st.integers(0, 3),
    "request_id": st.text(max_size=10),
    # Tools, forced calls and structured outputs: valid shapes (which reach the grammar
    # compiler and the parser) next to broken ones.
    "tools": st.lists(st.sampled_from([
        {"type": "function", "function": {"name": "add", "parameters": {
            "type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}}},
        {"type": "function", "function": {"name": "noop"}},
        {"type": "function", "function": {"name": "bad", "parameters": {"type": "nonsense"}}},
        {"type": "retrieval"}]), max_size=2) | st.lists(json_values, max_size=2),
    "tool_choice": st.sampled_from(["none", "auto", "required", {"type": "function", "function": {"name": "add"}},
                                    {"type": "function", "function": {"name": "missing"}}]) | json_values,
    "response_format": st.sampled_from([
        {"type": "text"}, {"type": "json_object"}, {"type": "xml"},
        {"type": "json_schema", "json_schema": {"name": "v", "schema": {"type": "object", "properties": {
            "ok": {"type": "boolean"}}, "required": ["ok"]}}},
        {"type": "json_schema", "json_schema": {"name": "v", "schema": {"type": 7}}}]) | json_values,
    "structured_outputs": st.sampled_from([
        {"regex": "[ab]{1,3}"}, {"choice": ["yes", "no"]}, {"json": {"type": "integer"}}, {"regex": "("},
        {"grammar": 'root ::= "x" | "y"'}, {"grammar": "root ::="}, {"choice": []}]) | json_values,
    "guided_regex": st.sampled_from(["[0-9]{1,2}", "(", ""]) | json_values,
    "guided_choice": st.sampled_from([["a", "b"], [], [""]]) | json_values,
    "cache_salt": st.text(max_size=4) | st.just("s" * 129),
}
good_prompts = texts | token_ids | st.lists(texts | token_ids, min_size=1, max_size=3)
completion_prompts = good_prompts | bad_token_ids | json_values
roles = st.sampled_from(["system", "user", "assistant", "tool", "developer", "alien"])
message = st.fixed_dictionaries({"role": roles, "content": texts | st.lists(
    st.fixed_dictionaries({"type": st.sampled_from(["text", "image_url"]), "text": texts}), max_size=2) | json_scalars})
good_messages = st.lists(st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant"]),
                                                 "content": texts}), min_size=1, max_size=3)
chat_messages = st.lists(message, min_size=1, max_size=3) | json_values


def _field_value(name: str, kind: str, hostile: bool) -> st.SearchStrategy[Any]:
    typed = _SPECIAL.get(name, _BY_KIND[kind])
    return st.one_of(typed, json_values) if hostile else typed


@st.composite
def _generation_body(draw: st.DrawFn, fields: dict[str, str], required: str, good: Any, any_value: Any) -> Any:
    """Half well-typed bodies (which reach the engine unless a value is out of range),
    half hostile ones: any JSON in any field, unknown fields, not an object at all."""
    hostile = draw(st.booleans())
    body: dict[str, Any] = {required: draw(any_value if hostile else good)}
    if draw(st.integers(0, 9)):  # mostly bounded output (unset means the whole context)
        body["max_tokens"] = draw(st.integers(0, 6))
    names = sorted(n for n in fields if n != required)
    for name in draw(st.lists(st.sampled_from(names), max_size=5 if hostile else 2, unique=True)):
        body[name] = draw(_field_value(name, fields[name], hostile))
    if hostile and not draw(st.integers(0, 4)):
        body[draw(st.text(min_size=1, max_size=6))] = draw(json_scalars)
    if hostile and not draw(st.integers(0, 9)):
        return draw(json_values)
    return body


@dataclass(frozen=True)
class Route:
    method: str
    path: str
    # Bodies (JSON-serializable, or bytes sent as is); None for a route without a body.
    body: st.SearchStrategy[Any] | None = None
    # Query strings to append.
    query: st.SearchStrategy[str] = st.just("")
    # Send the admin key (the admin routes); a wrong key is drawn now and then.
    admin: bool = False
    content_type: str = "application/json"
    # (method, path) sent after each example, to leave the engine as it was.
    undo: tuple[str, str] | None = None
    headers: dict[str, str] = field(default_factory=dict)


@st.composite
def _generate_body(draw: st.DrawFn) -> Any:
    """/inference/v1/generate: token ids and vLLM's sampling_params, typed or hostile."""
    hostile = draw(st.booleans())
    body: dict[str, Any] = {"token_ids": draw((bad_token_ids | json_values) if hostile else token_ids)}
    sampling: dict[str, Any] = {"max_tokens": draw(st.integers(0, 6))}
    names = sorted(TITO_SAMPLING_FIELDS)
    for name in draw(st.lists(st.sampled_from(names), max_size=4 if hostile else 2, unique=True)):
        sampling[name] = draw(_field_value(name, TITO_SAMPLING_FIELDS[name], hostile))
    body["sampling_params"] = draw(json_values) if hostile and not draw(st.integers(0, 4)) else sampling
    for name in draw(st.lists(st.sampled_from(["stream", "cache_salt", "request_id", "features", "priority", "zz"]),
                              max_size=2, unique=True)):
        body[name] = draw(json_scalars)
    return draw(json_values) if hostile and not draw(st.integers(0, 9)) else body


@st.composite
def _session_turn(draw: st.DrawFn) -> Any:
    """A chat turn on the session SESSION (deleted after each example): a first turn, or
    one whose history does not match what the server holds."""
    body = draw(_generation_body(CHAT_FIELDS, "messages", good_messages, chat_messages))
    if isinstance(body, dict):
        body["session_id"] = draw(st.sampled_from([SESSION, SESSION, ""]) | json_scalars)
    return body


SESSION = "fuzz-session"
modes = st.sampled_from(["keep", "abort", "wait", "recompute", "", "x"]).map(lambda m: f"?mode={m}") | st.just("")
ROUTES: list[Route] = [
    Route("POST", "/inference/v1/generate", _generate_body()),
    Route("POST", "/v1/chat/completions", _session_turn(), undo=("DELETE", f"/v1/sessions/{SESSION}")),
    Route("GET", f"/v1/sessions/{SESSION}"),
    Route("DELETE", "/v1/sessions/unknown-session"),
    Route("POST", "/v1/completions", _generation_body(COMPLETION_FIELDS, "prompt", good_prompts, completion_prompts)),
    Route("POST", "/v1/chat/completions", _generation_body(CHAT_FIELDS, "messages", good_messages, chat_messages)),
    Route("POST", "/tokenize", st.fixed_dictionaries({}, optional={
        "prompt": texts | json_values, "messages": chat_messages, "add_special_tokens": json_scalars,
        "model": _SPECIAL["model"]}) | json_values),
    Route("POST", "/detokenize", st.fixed_dictionaries({"tokens": token_ids}) | st.fixed_dictionaries(
        {"tokens": token_ids | bad_token_ids | json_values}, optional={"model": _SPECIAL["model"]}) | json_values),
    Route("GET", "/v1/models"),
    Route("GET", "/health"),
    Route("GET", "/metrics"),
    Route("GET", "/tokenizer_info"),
    Route("POST", "/pause", query=modes, admin=True, undo=("POST", "/resume")),
    Route("POST", "/resume", admin=True),
    Route("GET", "/is_paused", admin=True),
    Route("POST", "/reset_prefix_cache", admin=True),
    Route("GET", "/weight_version", admin=True),
    Route("POST", "/update_weights", st.fixed_dictionaries({}, optional={
        "path": st.text(max_size=12) | st.sampled_from(["../../etc/passwd", "/etc/hosts", "missing.safetensors"]),
        "mode": st.sampled_from(["keep", "abort", "recompute", "nope"]), "load_format": st.text(max_size=4)})
          | json_values, admin=True),
    Route("POST", "/update_weights", st.binary(max_size=64) | st.just(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      "),
          query=modes, admin=True, content_type="application/octet-stream"),
]
