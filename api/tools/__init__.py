"""Tool calling for /v1/chat/completions.

- `schema`: validation of `tools`, `tool_choice` and assistant `tool_calls` in the request.
- `render`: messages (+ tools) -> the chat template's input; a hermes-style fallback for
  templates that know nothing of tools.
- `parsers`: the parser registry (`--tool-call-parser`) and the hermes-style parser that turns
  model text into `message.tool_calls`.
- `streaming`: the same parse applied to text deltas, as `delta.tool_calls` chunks.
"""
from __future__ import annotations

from api.tools.parsers import PARSERS, ToolCall, ToolParser, default_parser_name, get_parser
from api.tools.render import render_messages, template_supports_tools
from api.tools.schema import ToolRequest, parse_tool_request
from api.tools.streaming import ToolStreamer, merge_tool_call_deltas

__all__ = [
    "PARSERS", "ToolCall", "ToolParser", "ToolRequest", "ToolStreamer", "default_parser_name", "get_parser",
    "merge_tool_call_deltas", "parse_tool_request", "render_messages", "template_supports_tools",
]
