"""Validation of the tool fields of a chat request: `tools`, `tool_choice`, `parallel_tool_calls`."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from api.protocol import bad

if TYPE_CHECKING:
    from asyncengine.structured import StructuredSpec


@dataclass(slots=True)
class ToolRequest:
    """The validated tool fields of one chat request."""

    # Function definitions as OpenAI sends them: {"type": "function", "function": {name, ...}}.
    tools: list[dict[str, Any]] = field(default_factory=list)
    # "none" (tools shown to the model, output never parsed), "auto" (parsed), "required" or
    # "function" (a named function: `forced` makes the model call it).
    choice: str = "none"
    # OpenAI's parallel_tool_calls: with "required", whether more than one call may follow.
    parallel: bool = True
    # The grammar that forces the call(s) ("required" / a named function), else None.
    forced: StructuredSpec | None = None

    @property
    def parse_calls(self) -> bool:
        return bool(self.tools) and self.choice != "none"


def parse_tool_request(body: dict[str, Any]) -> ToolRequest:
    """ToolRequest from a chat body whose top-level field types were already checked."""
    if body.get("functions") or body.get("function_call") not in (None, "none"):
        raise bad("the deprecated 'functions' / 'function_call' are not supported; use 'tools'",
                  "functions", "unsupported_parameter")
    tools = [_tool(t, i) for i, t in enumerate(body.get("tools") or [])]
    names = [t["function"]["name"] for t in tools]
    if len(set(names)) != len(names):
        raise bad("tool function names must be unique", "tools", "invalid_value")
    choice = body.get("tool_choice", "auto" if tools else "none")
    parallel = body.get("parallel_tool_calls", True)
    if isinstance(choice, dict) or choice == "required":
        forced = _forced_calls(tools, choice, parallel)
        return ToolRequest(tools, "required" if choice == "required" else "function", parallel, forced)
    if choice not in ("none", "auto"):
        raise bad("tool_choice must be 'none', 'auto', 'required' or a named function", "tool_choice",
                  "invalid_value")
    return ToolRequest(tools=tools, choice=choice, parallel=parallel)


def _forced_calls(tools: list[dict[str, Any]], choice: Any, parallel: bool) -> StructuredSpec:
    """The grammar of a forced call: hermes-style `<tool_call>{"name", "arguments"}</tool_call>`
    blocks whose arguments follow the function's parameter schema, over every tool
    ("required"; several calls when parallel) or over the named one (exactly one call). The
    parser then reads the call as any other, so forced and free calls come back alike."""
    from asyncengine.sampling_params import InvalidRequestError
    from asyncengine.structured import StructuredSpec
    from asyncengine.structured.tools import function_schemas, required_tag

    try:
        schemas = function_schemas(tools)
    except InvalidRequestError as exc:
        raise bad(str(exc), exc.param) from None
    if not schemas:
        raise bad("tool_choice 'required' or a named function needs at least one tool", "tool_choice")
    if choice != "required":
        fn = choice.get("function") if choice.get("type", "function") == "function" else None
        name = fn.get("name") if isinstance(fn, dict) else None
        if not isinstance(name, str) or name not in schemas:
            raise bad("tool_choice must name a function in tools: {'type': 'function', 'function': {'name': ...}}",
                      "tool_choice", "invalid_value")
        schemas, parallel = {name: schemas[name]}, False
    try:
        return StructuredSpec.structural_tag(required_tag(schemas, parallel), param="tool_choice")
    except InvalidRequestError as exc:
        raise bad(str(exc), exc.param) from None


def _tool(tool: Any, i: int) -> dict[str, Any]:
    param = f"tools[{i}]"
    if not isinstance(tool, dict) or tool.get("type", "function") != "function":
        raise bad(f"{param} must be an object with type 'function'", param, "invalid_type")
    fn = tool.get("function")
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
        raise bad(f"{param}.function must be an object with a non-empty string 'name'", f"{param}.function",
                  "invalid_type")
    for key, kind in (("description", str), ("parameters", dict), ("strict", bool)):
        if fn.get(key) is not None and not isinstance(fn[key], kind):
            raise bad(f"{param}.function.{key} must be of type {kind.__name__}", f"{param}.function.{key}",
                      "invalid_type")
    clean = {k: v for k, v in fn.items() if v is not None}
    return {"type": "function", "function": clean}


def message_tool_calls(calls: Any, param: str) -> list[dict[str, Any]]:
    """An assistant message's `tool_calls`, validated; `arguments` parsed from its JSON string
    when it is one (chat templates expect an object), kept as the string otherwise."""
    import json

    if not isinstance(calls, list):
        raise bad(f"{param} must be a list", param, "invalid_type")
    out = []
    for j, call in enumerate(calls):
        p = f"{param}[{j}]"
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise bad(f"{p} must be an object with a function {{name, arguments}}", p, "invalid_type")
        args = fn.get("arguments", "{}")
        if isinstance(args, str):
            try:
                args = json.loads(args) if args.strip() else {}
            except (ValueError, RecursionError):
                pass  # the model wrote invalid JSON once; the history keeps it verbatim
        elif not isinstance(args, dict):
            raise bad(f"{p}.function.arguments must be a JSON string", f"{p}.function.arguments", "invalid_type")
        out.append({"id": str(call.get("id") or f"call_{j}"), "type": "function",
                    "function": {"name": fn["name"], "arguments": args}})
    return out
