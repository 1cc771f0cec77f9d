"""Grammars for forced tool calls: `tool_choice` "required" or a named function.

A named function constrains the output to that function's arguments (a JSON object of its
parameter schema), as vLLM does; the caller wraps it into the tool call. "required" makes
the model emit hermes-style calls, one or more:
    <tool_call>\n{"name": "NAME", "arguments": {...}}\n</tool_call>
whose arguments follow the named function's parameter schema.
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from asyncengine.structured.spec import StructuredSpec, _fail

# A function without `parameters` takes none (OpenAI's convention).
_NO_PARAMETERS: dict[str, Any] = {"type": "object", "properties": {}}


def tool_call_spec(
    tools: Sequence[dict[str, Any]] | None, tool_choice: Any, *, parallel_tool_calls: bool = True
) -> StructuredSpec | None:
    """The spec that forces tool_choice over tools; None for "none" / "auto" (free text).
    Raises InvalidRequestError (param "tools" / "tool_choice") on a malformed request."""
    if tool_choice is None or tool_choice in ("none", "auto"):
        return None
    schemas = function_schemas(tools)
    if tool_choice == "required":
        if not schemas:
            _fail("tool_choice 'required' needs at least one tool", "tool_choice")
        return StructuredSpec.structural_tag(required_tag(schemas, parallel_tool_calls), param="tool_choice")
    name = _named(tool_choice)
    if name not in schemas:
        _fail(f"tool_choice names function {name!r}, which is not in tools", "tool_choice")
    return StructuredSpec.json_schema(schemas[name], param="tool_choice")


def function_schemas(tools: Sequence[dict[str, Any]] | None) -> dict[str, Any]:
    """name -> parameter schema of each OpenAI tool {"type": "function", "function": {...}}."""
    out: dict[str, Any] = {}
    for tool in tools or ():
        fn = tool.get("function") if isinstance(tool, dict) and tool.get("type", "function") == "function" else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            _fail("each tool must be {'type': 'function', 'function': {'name': ..., 'parameters': ...}}", "tools")
        params = fn.get("parameters", _NO_PARAMETERS)
        if not isinstance(params, (dict, bool)):
            _fail(f"tool {fn['name']!r}: parameters must be a JSON schema object", "tools")
        out[fn["name"]] = params
    return out


def required_tag(schemas: dict[str, Any], parallel: bool = True) -> dict[str, Any]:
    """xgrammar structural tag: one call (or, when parallel, calls separated by newlines)."""
    one_call = {"type": "or", "elements": [
        {
            "type": "tag",
            "begin": '<tool_call>\n{"name": ' + json.dumps(name, ensure_ascii=False) + ', "arguments": ',
            # At most one whitespace in a row: JSON allows any between tokens, and a weak or
            # random model can spend its whole budget there without ever closing the call.
            "content": {"type": "json_schema", "json_schema": schema, "max_whitespace_cnt": 1},
            "end": "}\n</tool_call>",
        }
        for name, schema in schemas.items()
    ]}
    if not parallel:
        return {"type": "structural_tag", "format": one_call}
    more = {"type": "star", "content": {"type": "sequence", "elements": [
        {"type": "const_string", "value": "\n"}, one_call]}}
    return {"type": "structural_tag", "format": {"type": "sequence", "elements": [one_call, more]}}


def _named(tool_choice: Any) -> str:
    fn = tool_choice.get("function") if isinstance(tool_choice, dict) else None
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
        _fail("tool_choice must be 'none', 'auto', 'required' or {'type': 'function', 'function': {'name': ...}}",
              "tool_choice")
    return fn["name"]
