"""OpenAI request parsing and validation -> SamplingParams, and OpenAI-style errors.

Every problem with a request becomes an APIError with a 4xx status before anything
reaches the engine; the engine's own validation (SamplingParams, context length)
raises InvalidRequestError, which the server maps the same way.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from api.structured import STRUCTURED_FIELDS, parse_structured
from asyncengine.sampling_params import MAX_TOP_LOGPROBS, InvalidRequestError, SamplingParams

if TYPE_CHECKING:
    from api.tools import ToolParser, ToolRequest

log = logging.getLogger(__name__)

MAX_N = 128
INT64 = (-(2**63), 2**64 - 1)


class APIError(Exception):
    """An error answered as {"error": {"message", "type", "param", "code"}}."""

    def __init__(
        self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
        code: str | None = None, headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


# Extensions (vLLM's and ours) that both endpoints take, with their JSON kind.
_EXTENSIONS = {
    "top_k": "int", "min_p": "number", "repetition_penalty": "number", "min_tokens": "int",
    "ignore_eos": "bool", "stop_token_ids": "int_list", "include_stop_str_in_output": "bool",
    "skip_special_tokens": "bool", "spaces_between_special_tokens": "bool", "logprobs_mode": "str",
    "return_raw_logprobs": "bool", "return_log_kept_mass": "bool", "return_token_ids": "bool",
    "return_weight_versions": "bool", "add_special_tokens": "bool", "request_id": "str",
    "return_tokens_as_token_ids": "bool", "prompt_logprobs": "int", "cache_salt": "str",
    "max_completion_tokens": "int", "priority": "int",
    **STRUCTURED_FIELDS,
}
# cache_salt longer than this is refused (it only needs to name a tenant or an experiment).
MAX_CACHE_SALT = 128
# The response header that names request fields the server ignored.
IGNORED_FIELDS_HEADER = "X-Ignored-Request-Fields"
_COMMON = {
    "model": "str", "max_tokens": "int", "temperature": "number", "top_p": "number", "n": "int",
    "stream": "bool", "stream_options": "object", "stop": "stop", "presence_penalty": "number",
    "frequency_penalty": "number", "seed": "int", "user": "str", "logit_bias": "object",
    "service_tier": "str", "store": "bool", "metadata": "object", **_EXTENSIONS,
}
COMPLETION_FIELDS = {**_COMMON, "prompt": "any", "logprobs": "int", "echo": "bool", "best_of": "int", "suffix": "str"}
CHAT_FIELDS = {
    **_COMMON, "messages": "any", "logprobs": "bool", "top_logprobs": "int", "chat_template_kwargs": "object",
    "chat_template": "str", "add_generation_prompt": "bool", "tools": "list", "tool_choice": "any",
    "parallel_tool_calls": "bool", "response_format": "object", "functions": "list", "function_call": "any",
    "modalities": "list", "reasoning_effort": "str", "session_id": "str",
}
_KIND_TYPES: dict[str, tuple[type, ...]] = {
    "int": (int,), "number": (int, float), "bool": (bool,), "str": (str,), "object": (dict,), "list": (list,),
}


def check_fields(body: Any, fields: dict[str, str], ignored: list[str] | None = None) -> dict[str, Any]:
    """The body as a dict whose known fields have the right JSON types (null = omitted).

    An unknown field is a 400, unless `ignored` is given: then (as vLLM does) its name is
    appended there, logged, and the field dropped."""
    if not isinstance(body, dict):
        raise bad("the request body must be a JSON object")
    for name, value in body.items():
        kind = fields.get(name)
        if kind is None:
            if ignored is None:
                raise bad(f"Unrecognized request argument supplied: {name}", name, "unknown_parameter")
            ignored.append(name)
            continue
        if value is None or kind in ("any", "stop"):
            continue
        if kind == "int_list":
            if isinstance(value, list) and all(_is_int(v) for v in value):
                continue
            raise bad(f"'{name}' must be a list of integers", name, "invalid_type")
        types = _KIND_TYPES[kind]
        if isinstance(value, bool) and kind != "bool" or not isinstance(value, types):
            raise bad(f"'{name}' must be of type {kind}, got {type(value).__name__}", name, "invalid_type")
    if ignored:
        log.warning("ignoring unknown request fields: %s", ignored_names(ignored))
    return {k: v for k, v in body.items() if v is not None and k in fields}


def ignored_names(names: list[str], most: int = 16, longest: int = 64) -> str:
    """Field names for a log line or a header: printable ASCII only (a name is client text and
    must not break a header line), each cut to `longest`, at most `most` of them."""
    safe = ["".join(c if " " <= c <= "~" else "?" for c in n[:longest]) for n in names[:most]]
    more = f", ... ({len(names) - most} more)" if len(names) > most else ""
    return ", ".join(safe) + more


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def check_unsupported(body: dict[str, Any]) -> None:
    """OpenAI fields we accept only at their no-op values (anything else is refused, not ignored)."""
    if body.get("logit_bias"):
        raise bad("logit_bias is not supported", "logit_bias", "unsupported_parameter")
    if body.get("suffix"):
        raise bad("suffix is not supported", "suffix", "unsupported_parameter")
    if body.get("chat_template") is not None:  # as vLLM without --trust-request-chat-template
        raise bad("a chat template sent with the request is refused: it would run client Jinja on the server "
                  "(a nested loop can stall it); the model's own template renders every chat", "chat_template",
                  "unsupported_parameter")
    if body.get("priority", 0) != 0:
        raise bad("priority scheduling is not supported; send priority 0 or omit it", "priority",
                  "unsupported_parameter")
    if body.get("modalities", ["text"]) != ["text"]:
        raise bad("only the text modality is supported", "modalities", "unsupported_parameter")


@dataclass(slots=True)
class GenerationRequest:
    """A validated /v1/completions or /v1/chat/completions request."""

    # "completion", "chat" or "generate" (/inference/v1/generate).
    kind: str
    model: str | None
    # Token ids of each prompt (chat: one prompt, the rendered conversation).
    prompts: list[list[int]]
    # Choices per prompt.
    n: int
    # Explicit max_tokens, or None for "up to the context limit".
    max_tokens: int | None
    # SamplingParams fields shared by every choice (all but max_tokens and seed).
    sampling: dict[str, Any]
    seed: int | None
    stream: bool = False
    include_usage: bool = False
    continuous_usage: bool = False
    # Completions: prepend the prompt (and its logprobs) to each choice.
    echo: bool = False
    # Top-N alternatives per token, or None for no logprobs in the response.
    logprobs: int | None = None
    return_token_ids: bool = False
    return_weight_versions: bool = False
    request_id: str | None = None
    prompt_texts: list[str | None] = field(default_factory=list)
    # vLLM's prompt_logprobs: top-K raw alternatives per prompt token, in vLLM's shape.
    prompt_logprobs: int | None = None
    # Every logprob token as "token_id:<id>" (vLLM's return_tokens_as_token_ids).
    tokens_as_ids: bool = False
    # Unknown request fields that were ignored (named in a response header).
    ignored_fields: list[str] = field(default_factory=list)
    # Chat: the tool fields, and the parser reading tool calls (None: content only).
    tools: ToolRequest | None = None
    tool_parser: ToolParser | None = None

    def params(self, prompt_index: int, choice: int, limit: int) -> SamplingParams:
        """SamplingParams of one choice; `limit` is the longest prompt + output the engine holds."""
        prompt_len = len(self.prompts[prompt_index])
        max_tokens = self.max_tokens
        if max_tokens is None:
            max_tokens = limit - prompt_len
            if max_tokens < 1:
                raise bad(  # vLLM's words: clients match on "maximum context length"
                    f"This model's maximum context length is {limit} tokens. However, your request has "
                    f"{prompt_len} input tokens. Please reduce the length of the input messages.",
                    "prompt", "context_length_exceeded",
                )
        seed = None if self.seed is None else self.seed + choice
        return SamplingParams(max_tokens=max_tokens, seed=seed, **self.sampling)


def sampling_fields(body: dict[str, Any]) -> dict[str, Any]:
    """SamplingParams keyword arguments from the fields both endpoints share."""
    out: dict[str, Any] = {}
    for name in ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "presence_penalty",
                 "frequency_penalty", "min_tokens", "ignore_eos", "include_stop_str_in_output",
                 "skip_special_tokens", "logprobs_mode"):
        if name in body:
            out[name] = body[name]
    stop = body.get("stop")
    if stop is not None:
        if isinstance(stop, str):
            stop = [stop]
        if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
            raise bad("'stop' must be a non-empty string or a list of non-empty strings", "stop", "invalid_type")
        out["stop"] = tuple(stop)
    if "stop_token_ids" in body:
        out["stop_token_ids"] = tuple(body["stop_token_ids"])
    out["return_raw_logprob"] = bool(body.get("return_raw_logprobs", False))
    out["return_log_kept_mass"] = bool(body.get("return_log_kept_mass", False))
    salt = body.get("cache_salt")
    if salt is not None:
        if not 0 < len(salt) <= MAX_CACHE_SALT:
            raise bad(f"'cache_salt' must be 1 to {MAX_CACHE_SALT} characters", "cache_salt", "invalid_value")
        out["cache_salt"] = salt
    try:  # response_format / structured_outputs / guided_* (api/structured.py)
        out["structured"] = parse_structured(body)
    except InvalidRequestError as exc:
        raise bad(str(exc), exc.param) from None
    return out


def common_request(kind: str, body: dict[str, Any], prompts: list[list[int]]) -> GenerationRequest:
    """The fields both endpoints share, validated."""
    n = body.get("n", 1)
    if not 1 <= n <= MAX_N:
        raise bad(f"'n' must be between 1 and {MAX_N}, got {n}", "n")
    seed = body.get("seed")
    if seed is not None and not INT64[0] <= seed <= INT64[1]:
        raise bad("'seed' must fit in 64 bits", "seed")
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    if max_tokens is not None and max_tokens < 0:
        raise bad(f"'max_tokens' must be >= 0, got {max_tokens}", "max_tokens")
    stream = body.get("stream", False)
    options = body.get("stream_options")
    if options is not None and not stream:
        raise bad("stream_options is only allowed when stream is true", "stream_options")
    options = options or {}
    unknown = set(options) - {"include_usage", "continuous_usage_stats"}
    if unknown or not all(isinstance(v, bool) for v in options.values()):
        raise bad("stream_options takes booleans include_usage and continuous_usage_stats", "stream_options")
    sampling = sampling_fields(body)
    prompt_lps = body.get("prompt_logprobs")
    if prompt_lps is not None:
        if not 0 <= prompt_lps <= MAX_TOP_LOGPROBS:
            raise bad(f"'prompt_logprobs' must be between 0 and {MAX_TOP_LOGPROBS}, got {prompt_lps}",
                      "prompt_logprobs")
        sampling["prompt_logprobs"] = prompt_lps
    return GenerationRequest(
        kind=kind, model=body.get("model"), prompts=prompts, n=n, max_tokens=max_tokens,
        sampling=sampling, seed=seed, stream=stream, prompt_logprobs=prompt_lps,
        include_usage=options.get("include_usage", False),
        continuous_usage=options.get("continuous_usage_stats", False),
        return_token_ids=body.get("return_token_ids", False),
        return_weight_versions=body.get("return_weight_versions", False),
        request_id=body.get("request_id"), tokens_as_ids=body.get("return_tokens_as_token_ids", False),
    )
