"""Per-request limits of the HTTP server (bounds on what one client can make it do).

Body size is aiohttp's client_max_size (413); header lines, fields and count are the
HTTP parser's limits (aiohttp answers 400 and closes the connection); the rest is
checked on each parsed generation request, before anything reaches the engine.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from api.protocol import GenerationRequest, bad
from asyncengine.sampling_params import MAX_TOP_LOGPROBS


@dataclass(frozen=True, slots=True)
class Limits:
    # Most tokens one request may ask the engine to generate: prompts x n x max_tokens
    # (max_tokens unset counts as the rest of the context).
    max_request_tokens: int = 2**20
    # Most stop strings per request, and the longest one (the detokenizer holds back
    # that many characters of text while a stop string could still be forming).
    max_stop_strings: int = 16
    max_stop_chars: int = 256
    # Most top logprobs per token (vLLM's --max-logprobs; OpenAI allows 20).
    max_logprobs: int = MAX_TOP_LOGPROBS
    # HTTP parser limits: a request line or header field in bytes, and header count.
    max_header_bytes: int = 8190
    max_headers: int = 64

    def __post_init__(self) -> None:
        for name in ("max_request_tokens", "max_stop_strings", "max_stop_chars", "max_header_bytes", "max_headers"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        if not 0 <= self.max_logprobs <= MAX_TOP_LOGPROBS:
            raise ValueError(f"max_logprobs must be in [0, {MAX_TOP_LOGPROBS}]")

    def handler_args(self) -> dict[str, Any]:
        """aiohttp RequestHandler arguments, passed as keywords of web.run_app / AppRunner,
        which hand them to every handler (`run_options`)."""
        return {"max_line_size": self.max_header_bytes, "max_field_size": self.max_header_bytes,
                "max_headers": self.max_headers}


def run_options(limits: Limits, access_log: logging.Logger | None) -> dict[str, Any]:
    """web.run_app's keywords after app, host, port and loop, for `serve` and the replicated
    front. The parser limits go in as plain keywords: aiohttp's run_app has no handler_args
    parameter (that is Application's), so handler_args=... reached each request handler as
    one unknown argument, and aiohttp then built the handler without any custom argument
    (logging "Failed to create request handler"): no header limits, no keep-alive setting."""
    return {"handler_cancellation": True, "access_log": access_log, "print": None, **limits.handler_args()}


LIMITS_KEY: web.AppKey[Limits] = web.AppKey("limits", Limits)


def check_limits(req: GenerationRequest, limits: Limits, context_limit: int) -> None:
    """Raise a 400 APIError when a parsed request exceeds a limit."""
    stop = req.sampling.get("stop", ())
    if len(stop) > limits.max_stop_strings:
        raise bad(f"at most {limits.max_stop_strings} stop strings are allowed, got {len(stop)}", "stop")
    if any(len(s) > limits.max_stop_chars for s in stop):
        raise bad(f"stop strings may be at most {limits.max_stop_chars} characters long", "stop")
    if req.logprobs is not None and req.logprobs > limits.max_logprobs:
        param = "top_logprobs" if req.kind == "chat" else "logprobs"
        raise bad(f"at most {limits.max_logprobs} logprobs per token are allowed, got {req.logprobs}", param)
    per_choice = [req.max_tokens if req.max_tokens is not None else max(0, context_limit - len(p))
                  for p in req.prompts]
    total = req.n * sum(per_choice)
    if total > limits.max_request_tokens:
        raise bad(f"the request asks for up to {total} generated tokens (prompts x n x max_tokens); this "
                  f"server allows {limits.max_request_tokens}: lower n or max_tokens", "max_tokens")
