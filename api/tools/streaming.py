"""Tool calls out of text deltas: `delta.content` and `delta.tool_calls` chunks.

The streamer sees the sampled text delta by delta. Text that cannot start a call marker is
content at once; a possible marker start is held back until it is decided; a call is held
until its end marker, then parsed whole: a valid call goes out as two deltas (id, type and
name with empty arguments first, then the arguments), an invalid one goes out as content.
Holding the whole call is what keeps the promise that malformed JSON stays content: deltas
already sent cannot be taken back. Whitespace around calls is held too, so a reply that is
only calls has content null, streamed or not. The full response runs the same streamer over
the whole text, so the two agree for any split of the text into deltas.
"""
from __future__ import annotations

import uuid
from typing import Any

from api.tools.parsers import ToolCall, ToolParser


class ToolStreamer:
    def __init__(self, parser: ToolParser) -> None:
        self.parser = parser
        self.calls: list[ToolCall] = []
        # Undecided text: a possible marker start, or the body of an open call.
        self._pending = ""
        self._in_call = False
        # Whitespace-only content not sent yet, and whether any other content was sent.
        self._held_space = ""
        self._sent_text = False

    def feed(self, text: str) -> tuple[str, list[dict[str, Any]]]:
        """(content delta, tool-call deltas) for the next piece of sampled text."""
        self._pending += text
        content: list[str] = []
        deltas: list[dict[str, Any]] = []
        p = self.parser
        while True:
            if self._in_call:
                j = self._pending.find(p.end)
                if j < 0:
                    break
                body, self._pending = self._pending[:j], self._pending[j + len(p.end):]
                self._in_call = False
                call = p.parse_block(body)
                if call is None:
                    content.append(self._content(p.start + body + p.end))
                else:
                    deltas += self._call_deltas(call)
                continue
            i = self._pending.find(p.start)
            if i < 0:
                keep = _marker_prefix_len(self._pending, p.start)
                cut = len(self._pending) - keep
                content.append(self._content(self._pending[:cut]))
                self._pending = self._pending[cut:]
                break
            content.append(self._content(self._pending[:i]))
            self._pending = self._pending[i + len(p.start):]
            self._in_call = True
        return "".join(content), deltas

    def finish(self) -> str:
        """The content still held when the text ends (an unclosed call stays content)."""
        rest = (self.parser.start if self._in_call else "") + self._pending
        self._pending, self._in_call = "", False
        out = self._content(rest)
        if self._held_space and (self._sent_text or not self.calls):
            out += self._held_space
        self._held_space = ""
        return out

    def _content(self, text: str) -> str:
        if not text:
            return ""
        if not text.strip():
            self._held_space += text
            return ""
        out, self._held_space = self._held_space + text, ""
        self._sent_text = True
        return out

    def _call_deltas(self, call: ToolCall) -> list[dict[str, Any]]:
        index = len(self.calls)
        self.calls.append(call)
        head = {"index": index, "id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                "function": {"name": call.name, "arguments": ""}}
        return [head, {"index": index, "function": {"arguments": call.arguments}}]


def _marker_prefix_len(text: str, marker: str) -> int:
    """Length of the longest suffix of text that is a proper prefix of marker."""
    for n in range(min(len(text), len(marker) - 1), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0


def merge_tool_call_deltas(deltas: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Full `message.tool_calls` from streamed deltas: per index, the first delta's id, type and
    name, and the arguments fragments concatenated."""
    calls: dict[int, dict[str, Any]] = {}
    for d in deltas:
        call = calls.get(d["index"])
        fn = d.get("function", {})
        if call is None:
            calls[d["index"]] = {"id": d.get("id"), "type": d.get("type", "function"),
                                 "function": {"name": fn.get("name", ""), "arguments": fn.get("arguments", "")}}
        else:
            call["function"]["arguments"] += fn.get("arguments", "")
    return [calls[i] for i in sorted(calls)]
