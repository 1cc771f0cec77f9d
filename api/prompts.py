"""Turn the prompt fields of completions and chat requests into token ids."""
from __future__ import annotations

from typing import Any

from api.protocol import (
    CHAT_FIELDS,
    COMPLETION_FIELDS,
    APIError,
    GenerationRequest,
    bad,
    check_fields,
    check_unsupported,
    common_request,
)
from api.tools import get_parser, parse_tool_request, render_messages
from api.tools.schema import message_tool_calls
from asyncengine.sampling_params import MAX_TOP_LOGPROBS

_ROLES = {"system", "developer", "user", "assistant", "tool"}


def parse_completion(body: Any, tokenizer: Any | None, vocab_size: int, strict: bool = False) -> GenerationRequest:
    """Validate a /v1/completions body and tokenize its prompt(s); unknown fields are
    ignored (and named in req.ignored_fields) unless `strict`."""
    ignored: list[str] = []
    body = check_fields(body, COMPLETION_FIELDS, None if strict else ignored)
    check_unsupported(body)
    if "prompt" not in body:
        raise bad("'prompt' is required", "prompt", "missing_required_parameter")
    add_special = body.get("add_special_tokens", True)
    ids, texts = completion_prompts(body["prompt"], tokenizer, add_special, vocab_size)
    req = common_request("completion", body, ids)
    req.ignored_fields = ignored
    best_of = body.get("best_of")
    if best_of is not None and best_of != req.n:
        raise bad("best_of is only supported equal to n", "best_of", "unsupported_parameter")
    logprobs = body.get("logprobs")
    if logprobs is not None:
        _check_top_n(logprobs, "logprobs")
        req.sampling["logprobs"] = logprobs
    req.logprobs = logprobs
    req.echo = body.get("echo", False)
    if req.echo:
        req.prompt_texts = [t if t is not None else _decode(tokenizer, p) for t, p in zip(texts, ids)]
        if logprobs is not None:
            req.sampling["prompt_logprobs"] = max(logprobs, req.sampling.get("prompt_logprobs") or 0)
    return req


def parse_chat(
    body: Any, tokenizer: Any | None, vocab_size: int, strict: bool = False, tool_parser: str = "hermes"
) -> GenerationRequest:
    """Validate a /v1/chat/completions body and render its messages (and tools) with the chat
    template; `tool_parser` names the registered parser that reads tool calls back."""
    ignored: list[str] = []
    body = check_fields(body, CHAT_FIELDS, None if strict else ignored)
    check_unsupported(body)
    if "messages" not in body:
        raise bad("'messages' is required", "messages", "missing_required_parameter")
    tools = parse_tool_request(body)
    text = render_chat(body["messages"], tokenizer, body.get("add_generation_prompt", True), tools.tools,
                       body.get("chat_template_kwargs") or {})
    ids = list(tokenizer.encode(text, add_special_tokens=body.get("add_special_tokens", False)))
    req = common_request("chat", body, [ids])
    req.ignored_fields = ignored
    req.tools = tools
    if tools.forced is not None:  # tool_choice required / named: the grammar forces the call
        if req.sampling.get("structured") is not None:
            raise bad("tool_choice that forces a call cannot be combined with response_format or "
                      "structured_outputs", "tool_choice", "invalid_value")
        req.sampling["structured"] = tools.forced
    if tools.parse_calls:
        req.tool_parser = get_parser(tool_parser)
    top = body.get("top_logprobs")
    if top is not None:
        _check_top_n(top, "top_logprobs")
        if not body.get("logprobs", False):
            raise bad("top_logprobs requires logprobs to be true", "top_logprobs")
    if body.get("logprobs", False):
        req.logprobs = top or 0
        req.sampling["logprobs"] = req.logprobs
    return req


def _check_top_n(value: int, param: str) -> None:
    if not 0 <= value <= MAX_TOP_LOGPROBS:
        raise bad(f"'{param}' must be between 0 and {MAX_TOP_LOGPROBS}, got {value}", param)


def completion_prompts(
    prompt: Any, tokenizer: Any | None, add_special_tokens: bool, vocab_size: int
) -> tuple[list[list[int]], list[str | None]]:
    """A string, a list of strings, token ids or a list of token-id lists -> (ids, texts)."""
    if isinstance(prompt, str):
        items: list[Any] = [prompt]
    elif isinstance(prompt, list) and prompt and all(_is_int(t) for t in prompt):
        items = [prompt]
    elif isinstance(prompt, list) and prompt and (all(isinstance(p, str) for p in prompt)
                                                  or all(isinstance(p, list) for p in prompt)):
        items = prompt
    else:
        raise bad("'prompt' must be a string, a list of strings, token ids or a list of token id lists",
                  "prompt", "invalid_type")
    ids: list[list[int]] = []
    texts: list[str | None] = []
    for item in items:
        if isinstance(item, str):
            ids.append(_encode(tokenizer, item, add_special_tokens))
            texts.append(item)
        elif isinstance(item, list) and all(_is_int(t) for t in item):
            ids.append(check_token_ids(item, vocab_size, "prompt"))
            texts.append(None)
        else:
            raise bad("'prompt' token id lists must hold integers", "prompt", "invalid_type")
        if not ids[-1]:
            raise bad("the prompt is empty", "prompt")
    return ids, texts


def check_token_ids(ids: Any, vocab_size: int, param: str) -> list[int]:
    if not isinstance(ids, list) or not all(_is_int(t) and 0 <= t < vocab_size for t in ids):
        raise bad(f"'{param}' token ids must be integers in [0, {vocab_size})", param, "invalid_value")
    return ids


# chat_template_kwargs may not override what the server itself passes to the template.
_RESERVED_TEMPLATE_KWARGS = {"conversation", "messages", "tools", "tokenize", "add_generation_prompt",
                             "chat_template", "return_dict", "return_tensors", "continue_final_message"}


def render_chat(
    messages: Any, tokenizer: Any | None, add_generation_prompt: bool, tools: list[dict[str, Any]] | None = None,
    template_kwargs: dict[str, Any] | None = None,
) -> str:
    """The conversation as text, through the tokenizer's chat template (api/tools/render.py
    for tools, tool calls and tool results)."""
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise APIError(422, "this model has no chat template", param="messages", code="no_chat_template")
    if not isinstance(messages, list) or not messages:
        raise bad("'messages' must be a non-empty list", "messages", "invalid_type")
    template_kwargs = template_kwargs or {}
    reserved = sorted(_RESERVED_TEMPLATE_KWARGS & set(template_kwargs))
    if reserved:
        raise bad(f"chat_template_kwargs may not set {', '.join(reserved)}", "chat_template_kwargs", "invalid_value")
    clean = [_message(m, i) for i, m in enumerate(messages)]
    try:
        return render_messages(clean, tools or [], tokenizer, add_generation_prompt, template_kwargs)
    except Exception as exc:  # a template may raise on a conversation it does not accept
        raise bad(f"the chat template rejected the messages: {exc}", "messages") from exc


def _message(m: Any, i: int) -> dict[str, Any]:
    param = f"messages[{i}]"
    if not isinstance(m, dict) or not isinstance(m.get("role"), str):
        raise bad(f"{param} must be an object with a string 'role'", param, "invalid_type")
    if m["role"] not in _ROLES:
        raise bad(f"{param}.role must be one of {sorted(_ROLES)}", f"{param}.role", "invalid_value")
    content = m.get("content")
    if content is None:
        content = ""
    elif isinstance(content, list):
        parts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise bad(f"{param}.content supports only text parts", f"{param}.content", "invalid_type")
            parts.append(part["text"])
        content = "".join(parts)
    elif not isinstance(content, str):
        raise bad(f"{param}.content must be a string or a list of text parts", f"{param}.content", "invalid_type")
    out: dict[str, Any] = {"role": m["role"], "content": content}
    if isinstance(m.get("name"), str):
        out["name"] = m["name"]
    if m["role"] == "assistant" and m.get("tool_calls"):
        out["tool_calls"] = message_tool_calls(m["tool_calls"], f"{param}.tool_calls")
    if m["role"] == "tool" and m.get("tool_call_id") is not None:
        out["tool_call_id"] = str(m["tool_call_id"])
    return out


def _encode(tokenizer: Any | None, text: str, add_special_tokens: bool) -> list[int]:
    if tokenizer is None:
        raise APIError(422, "text prompts need a tokenizer; send token ids", param="prompt", code="no_tokenizer")
    return list(tokenizer.encode(text, add_special_tokens=add_special_tokens))


def _decode(tokenizer: Any | None, ids: list[int]) -> str:
    return "" if tokenizer is None else str(tokenizer.decode(ids, skip_special_tokens=False))


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)
