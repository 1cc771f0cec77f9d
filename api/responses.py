"""OpenAI response shapes built from engine deltas.

Streaming and non-streaming responses come from the same per-delta pieces: a stream
sends each piece as a chunk, a full response merges them. So a stream concatenated
equals the full response by construction (text, token ids, logprobs).
"""
from __future__ import annotations

import math
from typing import Any

from api.protocol import GenerationRequest
from api.tools import ToolStreamer, merge_tool_call_deltas
from asyncengine.outputs import RequestOutput, TopLogprobs

# What vLLM sends for a logprob of -inf (JSON has no infinities).
NEG_INF_LOGPROB = -9999.0


def lp(x: float | None) -> float | None:
    if x is None:
        return None
    return NEG_INF_LOGPROB if math.isinf(x) or math.isnan(x) else x


class TokenStrings:
    """Text of single tokens (for logprobs), decoded once and cached; with `as_ids` (or no
    tokenizer) every token is "token_id:<id>" (vLLM's return_tokens_as_token_ids)."""

    def __init__(self, tokenizer: Any | None, as_ids: bool = False) -> None:
        self.tokenizer = tokenizer
        self.as_ids = as_ids
        self._cache: dict[int, str] = {}

    def __call__(self, token_id: int) -> str:
        s = self._cache.get(token_id)
        if s is None:
            if self.tokenizer is None or self.as_ids:
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
        # Chat with tools: reads tool calls out of the text (None: the text is all content).
        self.tool_streamer = ToolStreamer(req.tool_parser) if req.tool_parser is not None else None

    def piece(self, out: RequestOutput) -> dict[str, Any]:
        """The choice object of the chunk for this delta."""
        first, self.first = self.first, False
        self.num_output_tokens = out.num_output_tokens
        self.num_cached_tokens = out.num_cached_tokens
        self.finished = out.finished
        if self.req.kind == "completion":
            choice = self._completion_piece(out, first)
        else:
            choice = self._chat_piece(out)
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
            # [:logprobs]: an echoed prompt's alternatives may be more (prompt_logprobs K > logprobs).
            entry = {self.tokens(t): lp(v) for t, v in (top or [])[: self.req.logprobs]}
            # Like OpenAI and vLLM: the chosen token is always among the alternatives.
            entry.setdefault(s, lp(x))
            dst["top_logprobs"].append(entry)

    def _chat_piece(self, out: RequestOutput) -> dict[str, Any]:
        """A chat choice chunk; for /inference/v1/generate the same without the text delta."""
        logprobs = None
        if self.req.logprobs is not None:
            tops = out.top_logprobs or [[] for _ in out.token_ids]
            logprobs = {"content": [
                {**self._chat_token(tid, x), "top_logprobs": [self._chat_token(t, v) for t, v in top]}
                for tid, x, top in zip(out.token_ids, out.logprobs, tops)
            ]}
        delta: dict[str, Any] = {"content": out.text}
        finish_reason = out.finish_reason if out.finished else None
        if self.tool_streamer is not None:
            content, calls = self.tool_streamer.feed(out.text)
            if out.finished:
                content += self.tool_streamer.finish()
                if self.tool_streamer.calls and finish_reason == "stop":
                    finish_reason = "tool_calls"
            delta = {"content": content or (None if calls else "")}
            if calls:
                delta["tool_calls"] = calls
        piece = {"index": self.index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason,
                 "stop_reason": out.stop_reason if out.finished else None}
        if self.req.kind == "generate":  # token in, token out: no text
            del piece["delta"]
        return piece

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
        if req.return_weight_versions and out.kv_epochs is not None:  # the final piece: the KV's versions
            choice["kv_epochs"] = [list(e) for e in out.kv_epochs]
        if out.raw_logprobs is not None:
            choice["raw_logprobs"] = [lp(x) for x in out.raw_logprobs]
        if out.log_kept_mass is not None:
            choice["log_kept_mass"] = [lp(x) for x in out.log_kept_mass]
        if req.prompt_logprobs is not None and out.prompt_logprobs is not None:
            choice["prompt_logprobs"] = vllm_prompt_logprobs(
                self.prompt_ids, out.prompt_logprobs, out.prompt_top_logprobs, req.prompt_logprobs, self.tokens)


def vllm_prompt_logprobs(
    ids: list[int], lps: list[float | None], tops: list[TopLogprobs | None] | None, k: int, tokens: TokenStrings,
) -> list[dict[str, dict[str, Any]] | None]:
    """vLLM's prompt_logprobs: per prompt position None (the first) or {str(token id):
    {logprob, rank, decoded_token}} for the prompt token and its top-k raw alternatives.

    Ranks are 1-based positions among the top-k. A prompt token outside its top-k gets rank
    k + 1, a lower bound: the engine returns the top-k, not the token's rank in the vocabulary."""
    out: list[dict[str, dict[str, Any]] | None] = []
    for pos, (tid, x) in enumerate(zip(ids, lps)):
        if x is None:
            out.append(None)
            continue
        top = (tops[pos] if tops is not None else None) or []
        entry = {str(t): {"logprob": lp(v), "rank": r, "decoded_token": tokens(t)}
                 for r, (t, v) in enumerate(top[:k], start=1)}
        if str(tid) not in entry:
            entry = {str(tid): {"logprob": lp(x), "rank": k + 1, "decoded_token": tokens(tid)}, **entry}
        out.append(entry)
    return out


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
        if delta.get("tool_calls"):
            merged["message"]["tool_calls"] = merge_tool_call_deltas(delta["tool_calls"])
            merged["message"]["content"] = delta.get("content") or None
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
