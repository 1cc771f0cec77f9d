"""Messages and tools -> the chat template's input, with a fallback for templates without tools.

A template that uses `tools` (HF's convention: Qwen2/Qwen3, Hermes, Llama 3.1, ...) gets the
tool definitions, assistant `tool_calls` and `role: "tool"` messages as they are. A template
that knows nothing of tools (SmolLM2-135M-Instruct's, and any plain ChatML one) gets the
documented hermes-style fallback, made only of messages it can render:
- the tool definitions listed in the system message (appended to the first system message,
  or a new one), one JSON object per line inside `<tools></tools>`;
- an assistant turn's calls appended to its content as `<tool_call>{"name", "arguments"}</tool_call>`
  (a null content becomes "");
- consecutive `role: "tool"` results merged into one user turn of `<tool_response>` blocks.
The model's reply is then read by the hermes parser (api/tools/parsers.py).
"""
from __future__ import annotations

import json
from typing import Any

FALLBACK_TOOLS_PROMPT = (
    "# Tools\n\nYou may call one or more functions to help with the user's request. The functions "
    "you can call are described, one JSON object per line, between <tools> and </tools>:\n<tools>\n{tools}\n"
    "</tools>\n\nTo call a function, reply with a JSON object holding its name and arguments between "
    "<tool_call> and </tool_call>, one call per block:\n<tool_call>\n"
    '{{"name": <function name>, "arguments": <arguments as a JSON object>}}\n</tool_call>'
)


def template_source(tokenizer: Any | None) -> str:
    template = getattr(tokenizer, "chat_template", None) if tokenizer is not None else None
    if isinstance(template, dict):  # named templates: the default one renders chats
        template = template.get("default") or next(iter(template.values()), "")
    return template if isinstance(template, str) else ""


def template_supports_tools(tokenizer: Any | None) -> bool:
    return "tools" in template_source(tokenizer)


def render_messages(
    messages: list[dict[str, Any]], tools: list[dict[str, Any]], tokenizer: Any, add_generation_prompt: bool,
    template_kwargs: dict[str, Any],
) -> str:
    """The conversation as text. `messages` are validated (content a string, assistant
    `tool_calls` with object arguments); `tools` are validated OpenAI tool definitions."""
    if template_supports_tools(tokenizer):
        kwargs = {**template_kwargs, **({"tools": tools} if tools else {})}
        conversation = messages
    else:
        kwargs = dict(template_kwargs)
        conversation = fallback_messages(messages, tools)
    return str(tokenizer.apply_chat_template(
        conversation, tokenize=False, add_generation_prompt=add_generation_prompt, **kwargs))


def fallback_messages(messages: list[dict[str, Any]], tools: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Plain role/content messages carrying tools, calls and results as hermes-style text."""
    out: list[dict[str, Any]] = []
    for m in messages:
        role, content = m["role"], m.get("content") or ""
        if role == "assistant" and m.get("tool_calls"):
            blocks = [_call_block(c) for c in m["tool_calls"]]
            content = "\n".join(([content] if content else []) + blocks)
        if role == "tool":
            block = f"<tool_response>\n{content}\n</tool_response>"
            if out and out[-1].get("_tool_results"):
                out[-1]["content"] += "\n" + block
                continue
            out.append({"role": "user", "content": block, "_tool_results": True})
            continue
        out.append({k: v for k, v in (("role", role), ("content", content), ("name", m.get("name"))) if v is not None})
    for m in out:
        m.pop("_tool_results", None)
    if tools:
        listing = FALLBACK_TOOLS_PROMPT.format(tools="\n".join(json.dumps(t, ensure_ascii=False) for t in tools))
        if out and out[0]["role"] in ("system", "developer"):
            out[0] = {**out[0], "content": (out[0]["content"] + "\n\n" + listing).lstrip()}
        else:
            out.insert(0, {"role": "system", "content": listing})
    return out


def _call_block(call: dict[str, Any]) -> str:
    fn = call["function"]
    body = json.dumps({"name": fn["name"], "arguments": fn["arguments"]}, ensure_ascii=False)
    return f"<tool_call>\n{body}\n</tool_call>"
