"""Forced tool calls as grammars (tool_call_spec), and the pieces under them: the support
rule with a grammar, the bitmask unpacking, the JSON-safe string rewrite."""
from __future__ import annotations

import json
import re

import jsonschema
import pytest
import torch

from asyncengine import logprobs as L
from asyncengine.engine_core import EngineCore
from asyncengine.sampling_params import InvalidRequestError, SamplingParams
from asyncengine.structured import StructuredSpec, tool_call_spec
from asyncengine.structured.backend import json_safe_strings
from asyncengine.structured.bitmask import unpack
from tests.invariance_harness import Req, run
from tests.test_structured import engine  # noqa: F401 (fixture)

WEATHER = {"type": "object", "properties": {"city": {"enum": ["Paris", "Oslo"]}, "days": {"type": "integer",
           "minimum": 1, "maximum": 7}}, "required": ["city", "days"]}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "parameters": WEATHER}},
    {"type": "function", "function": {"name": "ping"}},
]
CALL = re.compile(r'<tool_call>\n\{"name": "(get_weather|ping)", "arguments": (.*?)\}\n</tool_call>', re.S)


def _outputs(engine: EngineCore, spec: StructuredSpec, n: int) -> list[tuple[str, str | None]]:
    reqs = [Req(f"t{s}", (1, 3, 5 + s), SamplingParams(seed=s, max_tokens=300, structured=spec)) for s in range(n)]
    out = run(engine, reqs)
    return [(engine.tokenizer.decode(list(out[r.rid].token_ids), skip_special_tokens=True), out[r.rid].finish_reason)
            for r in reqs]


def test_required_emits_hermes_calls_with_valid_arguments(engine: EngineCore) -> None:
    spec = tool_call_spec(TOOLS, "required")
    assert spec is not None and spec.param == "tool_choice"
    names = set()
    for text, reason in _outputs(engine, spec, 16):
        if reason == "length":
            assert text.startswith("<tool_call>\n"), text
            continue
        calls = CALL.findall(text)
        assert calls and "\n".join(f'<tool_call>\n{{"name": "{n}", "arguments": {a}}}\n</tool_call>'
                                   for n, a in calls) == text, text
        for name, args in calls:
            jsonschema.validate(json.loads(args), WEATHER if name == "get_weather" else {"type": "object"})
            names.add(name)
    assert names  # at least one output completed


def test_single_call_without_parallel(engine: EngineCore) -> None:
    spec = tool_call_spec(TOOLS, "required", parallel_tool_calls=False)
    assert spec is not None
    for text, reason in _outputs(engine, spec, 8):
        if reason == "stop":
            assert len(CALL.findall(text)) == 1 and text.endswith("</tool_call>"), text


def test_named_function_constrains_its_arguments(engine: EngineCore) -> None:
    spec = tool_call_spec(TOOLS, {"type": "function", "function": {"name": "get_weather"}})
    assert spec is not None and spec.kind == "json_schema"
    for text, reason in _outputs(engine, spec, 8):
        if reason == "stop":
            jsonschema.validate(json.loads(text), WEATHER)


@pytest.mark.parametrize(("tools", "choice", "param"), [
    (TOOLS, {"type": "function", "function": {"name": "nope"}}, "tool_choice"),
    (TOOLS, "sometimes", "tool_choice"),
    ([], "required", "tool_choice"),
    ([{"type": "function", "function": {"parameters": {}}}], "required", "tools"),
    ([{"type": "function", "function": {"name": "f", "parameters": 3}}], "required", "tools"),
])
def test_bad_tool_choice(tools: list, choice: object, param: str) -> None:
    with pytest.raises(InvalidRequestError) as err:
        tool_call_spec(tools, choice)
    assert err.value.param == param


def test_auto_and_none_are_free() -> None:
    assert tool_call_spec(TOOLS, "auto") is None and tool_call_spec(TOOLS, "none") is None


def test_grammar_support_intersects_after_truncation_and_falls_back() -> None:
    z = torch.tensor([[3.0, 2.0, 1.0, 0.0, -1.0]])  # [1, V]
    sp = [SamplingParams(top_k=2)]
    s = L.support_mask(z, sp)
    allowed = torch.tensor([[False, True, True, True, True]])
    assert L.grammar_support(z, sp, s, allowed).tolist() == [[False, True, False, False, False]]
    only_tail = torch.tensor([[False, False, False, True, True]])  # top-2 keeps none of these
    assert L.grammar_support(z, sp, s, only_tail).tolist() == [[False, False, False, True, True]]
    assert L.grammar_support(z, sp, s, None) is s


def test_unpack_matches_bit_order() -> None:
    bits = torch.tensor([[1 | (1 << 5), -(1 << 31)], [0, 1]], dtype=torch.int32)  # tokens 0, 5, 63 | 32
    got = unpack(bits, 64)
    assert torch.nonzero(got[0]).flatten().tolist() == [0, 5, 63]
    assert torch.nonzero(got[1]).flatten().tolist() == [32]
    assert unpack(bits, 40).shape == (2, 40)


def test_json_safe_strings_rewrites_only_free_bounded_strings() -> None:
    schema = {"type": "object", "properties": {
        "a": {"type": "string", "maxLength": 3}, "b": {"type": "string", "pattern": "^x$", "maxLength": 2},
        "c": {"type": "array", "items": {"type": "string", "minLength": 1}}, "d": {"type": "string"}}}
    out = json_safe_strings(schema)["properties"]
    assert out["a"] == {"type": "string", "pattern": '^[^"\\\\\\x00-\\x1f]{0,3}$'}
    assert out["b"] == schema["properties"]["b"] and out["d"] == {"type": "string"}
    assert out["c"]["items"]["pattern"].endswith("{1,}$")
    assert re.fullmatch(out["a"]["pattern"], "ab\x04") is None and re.fullmatch(out["a"]["pattern"], "a b")


def test_spec_validation() -> None:
    with pytest.raises(InvalidRequestError):
        StructuredSpec("xml", "")  # type: ignore[arg-type]
    with pytest.raises(InvalidRequestError):
        StructuredSpec.regex("")
    with pytest.raises(InvalidRequestError):
        SamplingParams(structured="json")  # type: ignore[arg-type]
    a = StructuredSpec.json_schema({"type": "object"}, param="guided_json")
    assert a == StructuredSpec.json_schema('{"type": "object"}') and hash(a) == hash(StructuredSpec.json_schema({"type": "object"}))


class _NothingAllowed:
    """A matcher whose grammar allows no token (a tokenizer that cannot spell it)."""

    def is_terminated(self) -> bool:
        return False

    def fill_next_token_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        bitmask[row].zero_()

    def accept_token(self, token_id: int) -> bool:
        return False


def test_empty_mask_falls_back_to_eos_then_ends() -> None:
    from asyncengine.structured.bitmask import allowed_tokens
    from asyncengine.structured.state import GrammarState

    state = GrammarState(_NothingAllowed(), [2, 7])
    got = allowed_tokens([None, state], [(), ()], 40)
    assert got is not None and got[0].all() and torch.nonzero(got[1]).flatten().tolist() == [2, 7]
    assert not state.accept(2) and state.is_done  # the grammar rejects it: a dead end, nothing follows
    after = allowed_tokens([state], [[2]], 40)
    assert after is not None and torch.nonzero(after[0]).flatten().tolist() == [2, 7]
