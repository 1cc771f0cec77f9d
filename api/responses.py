"""OpenAI response shapes built from engine deltas.

Streaming and non-streaming responses come from the same per-delta pieces: a stream
sends each piece as a chunk, a full response merges them. So a stream concatenated
equals the full response by construction (text, token ids, logprobs).
"""
from __future__ import annotations

import math
from typing import Any

from api.protocol import GenerationRequest
from asyncengine.outputs import RequestOutput, TopLogprobs

# What vLLM sends for a logprob of -inf (JSON has no infinities).
NEG_INF_LOGPROB = -9999.0


def lp(x: float | None) -> float | None:
    if x is None:
        return None
    return NEG_INF_LOGPROB if math.isinf(x) or math.isnan(x) else x


class TokenStrings:
    """Text of single tokens (for logprobs), decoded once and cached."""

    def __init__(self, tokenizer: Any | None) -> None:
        self.tokenizer = tokenizer
        self._cache: dict[int, str] = {}

    def __call__(self, token_id: int) -> str:
        s = self._cache.get(token_id)
        if s is None:
            if self.tokenizer is None:
                s = f"token_id:{token_id}"
            else:
                s = str(self.tokenizer.decode([token_id], skip_special_tokens=False))
            self._cache[token_id] = s
        return s


class ChoiceBuilder:
    """One choice's response pieces, one per engine delta."""

    def __init__(self, req: GenerationRequest, index: int, prompt_index: int, tokens: TokenStrings) -> None:
        self.req = req
        self.index = index
        self.prompt_index = prompt_index
        self.prompt_ids = req.prompts[prompt_index]
        self.tokens = tokens
        self.first = True
        # Characters of the token strings so far (completions' text_offset).
        self.offset = 0
        self.num_output_tokens = 0
        self.num_cached_tokens = 0
        self.finished = False

    def piece(self, out: RequestOutput) -> dict[str, Any]:
        """The choice object of the chunk for this delta."""
        first, self.first = self.first, False
        self.num_output_tokens = out.num_output_tokens
        self.num_cached_tokens = out.num_cached_tokens
        self.finished = out.finished
        if self.req.kind == "chat":
            choice = self._chat_piece(out)
        else:
            choice = self._completion_piece(out, first)
        self._extensions(choice, out, first)
        return choice

    def _completion_piece(self, out: RequestOutput, first: bool) -> dict[str, Any]:
        req = self.req
        text = out.text
        logprobs = None
        if req.logprobs is not None:
            logprobs = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        if first and req.echo:
            text = req.prompt_texts[self.prompt_index] + text
            if logprobs is not None:
                prompt_lps = out.prompt_logprobs or [None] * len(self.prompt_ids)
                prompt_tops = out.prompt_top_logprobs or [None] * len(self.prompt_ids)
                self._add_completion_lps(logprobs, self.prompt_ids, prompt_lps, prompt_tops)
        if logprobs is not None:
            tops = out.top_logprobs or [None] * len(out.token_ids)
            self._add_completion_lps(logprobs, out.token_ids, out.logprobs, tops)
        return {
            "index": self.index, "text": text, "logprobs": logprobs,
            "finish_reason": out.finish_reason if out.finished else None,
            "stop_reason": out.stop_reason if out.finished else None,
        }

    def _add_completion_lps(
        self, dst: dict[str, list[Any]], ids: list[int], lps: list[float | None], tops: list[TopLogprobs | None]
    ) -> None:
        for tid, x, top in zip(ids, lps, tops):
            s = self.tokens(tid)
            dst["tokens"].append(s)
            dst["token_logprobs"].append(lp(x))
            dst["text_offset"].append(self.offset)
            self.offset += len(s)
            if x is None:
                dst["top_logprobs"].append(None)
                continue
            entry = {self.tokens(t): lp(v) for t, v in (top or [])}
            # Like OpenAI and vLLM: the chosen token is always among the alternatives.
            entry.setdefault(s, lp(x))
            dst["top_logprobs"].append(entry)

    def _chat_piece(self, out: RequestOutput) -> dict[str, Any]:
        logprobs = None
        if self.req.logprobs is not None:
            tops = out.top_logprobs or [[] for _ in out.token_ids]
            logprobs = {"content": [
                {**self._chat_token(tid, x), "top_logprobs": [self._chat_token(t, v) for t, v in top]}
                for tid, x, top in zip(out.token_ids, out.logprobs, tops)
            ]}
        return {
            "index": self.index, "delta": {"content": out.text}, "logprobs": logprobs,
            "finish_reason": out.finish_reason if out.finished else None,
            "stop_reason": out.stop_reason if out.finished else None,
        }

    def _chat_token(self, token_id: int, logprob: float) -> dict[str, Any]:
        s = self.tokens(token_id)
        return {"token": s, "logprob": lp(logprob), "bytes": list(s.encode("utf-8"))}

    def _extensions(self, choice: dict[str, Any], out: RequestOutput, first: bool) -> None:
        req = self.req
        if req.return_token_ids:
            choice["token_ids"] = list(out.token_ids)
            if first and req.kind == "completion":
                choice["prompt_token_ids"] = list(self.prompt_ids)
        if req.return_weight_versions or req.return_token_ids:
            choice["weight_versions"] = list(out.weight_versions)
        if out.raw_logprobs is not None:
            choice["raw_logprobs"] = [lp(x) for x in out.raw_logprobs]
        if out.log_kept_mass is not None:
            choice["log_kept_mass"] = [lp(x) for x in out.log_kept_mass]


def role_piece(index: int) -> dict[str, Any]:
    """The first chunk of a streamed chat choice, as OpenAI sends it."""
    return {"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}


def merge_pieces(pieces: list[dict[str, Any]]) -> dict[str, Any]:
    """One choice from its pieces: strings and lists concatenate, scalars keep the last value."""
    merged: dict[str, Any] = {}
    for piece in pieces:
        _merge_into(merged, piece)
    if "delta" in merged:  # chat: a full response has a message, not a delta
        delta = merged.pop("delta")
        merged["message"] = {"role": "assistant", "content": delta.get("content", "")}
    return merged


def _merge_into(dst: dict[str, Any], src: dict[str, Any]) -> None:
    for key, value in src.items():
        old = dst.get(key)
        if isinstance(value, str) and isinstance(old, str) and key not in ("finish_reason", "stop_reason"):
            dst[key] = old + value
        elif isinstance(value, list) and isinstance(old, list):
            old.extend(value)
        elif isinstance(value, dict) and isinstance(old, dict):
            _merge_into(old, value)
        elif isinstance(value, (list, dict)):
            dst[key] = _copy(value)
        elif value is not None or key not in dst:
            dst[key] = value


def _copy(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_copy(v) for v in value]
    return value


def usage(req: GenerationRequest, builders: list[ChoiceBuilder]) -> dict[str, Any]:
    prompt_tokens = sum(len(p) for p in req.prompts)
    completion_tokens = sum(b.num_output_tokens for b in builders)
    cached = sum(b.num_cached_tokens for b in builders if b.index % req.n == 0)
    return {
        "prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens, "prompt_tokens_details": {"cached_tokens": cached},
    }
