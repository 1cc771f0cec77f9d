"""Tool-call parsers: model text -> OpenAI tool calls. The registry backs `--tool-call-parser`.

A parser knows the markers around one call and how to read the text between them. Text
outside the markers is content; a block that is not a valid call (bad JSON, no name,
arguments that are not an object) stays content verbatim, so a malformed call is never an
error and never lost. Non-streaming responses run the same streamer over the whole text
(api/tools/streaming.py), so both shapes agree by construction.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ToolCall:
    name: str
    # The arguments as a JSON string holding an object (what OpenAI sends).
    arguments: str


class ToolParser:
    """Base: a call is `start` + body + `end`; subclasses read the body."""

    name = ""
    start = ""
    end = ""

    def parse_block(self, body: str) -> ToolCall | None:
        """The call written between the markers, or None when it is not a valid call."""
        raise NotImplementedError


class HermesToolParser(ToolParser):
    """`<tool_call>{"name": ..., "arguments": {...}}</tool_call>` (Hermes, Qwen2/Qwen3, and our
    fallback rendering for templates without tool support, e.g. SmolLM2's)."""

    name = "hermes"
    start = "<tool_call>"
    end = "</tool_call>"

    def parse_block(self, body: str) -> ToolCall | None:
        try:
            obj = json.loads(body)
        except (ValueError, RecursionError):  # RecursionError: absurdly deep nesting
            return None
        if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not obj["name"]:
            return None
        args: Any = obj.get("arguments", obj.get("parameters", {}))
        if isinstance(args, str):  # some models write the arguments as a JSON string already
            try:
                args = json.loads(args)
            except (ValueError, RecursionError):
                return None
        if not isinstance(args, dict):
            return None
        return ToolCall(obj["name"], json.dumps(args, ensure_ascii=False))


PARSERS: dict[str, type[ToolParser]] = {HermesToolParser.name: HermesToolParser}


def get_parser(name: str) -> ToolParser:
    cls = PARSERS.get(name)
    if cls is None:
        raise ValueError(f"unknown tool-call parser {name!r}; known: {sorted(PARSERS)}")
    return cls()


def default_parser_name(tokenizer: Any | None) -> str:
    """The parser that matches the model's chat template.

    A template that writes `<tool_call>` is hermes-style; one with no tool support gets our
    hermes-style fallback rendering, so hermes again. Any other tool format needs
    `--tool-call-parser`; until a parser for it is registered, hermes is used and we say so.
    """
    from api.tools.render import template_source, template_supports_tools

    source = template_source(tokenizer)
    if "<tool_call>" in source or not template_supports_tools(tokenizer):
        return HermesToolParser.name
    log.warning("the chat template renders tools in a format no registered parser knows; using %r "
                "(choose one with --tool-call-parser)", HermesToolParser.name)
    return HermesToolParser.name
