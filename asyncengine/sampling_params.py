"""Per-request sampling parameters and their validation."""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Literal

from asyncengine.structured.spec import StructuredSpec

LogprobsMode = Literal["processed", "raw"]
MAX_TOP_LOGPROBS = 20
# Temperatures below this are greedy: dividing logits by a tinier T overflows to inf/NaN.
GREEDY_TEMPERATURE = 1e-5


class InvalidRequestError(ValueError):
    """A request's parameters or prompt are invalid; `param` names the offending field."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


@dataclass(frozen=True, slots=True)
class SamplingParams:
    # Most tokens to generate; 0 only scores the prompt (with prompt_logprobs).
    max_tokens: int = 16
    # Tokens to generate before EOS / stop tokens may end the request.
    min_tokens: int = 0
    # 0 (or below GREEDY_TEMPERATURE) means greedy (argmax); processed logprobs then use T=1.
    temperature: float = 1.0
    # Keep the k most likely tokens (ties by lower token id); 0 or -1 = off.
    top_k: int = 0
    # Keep the smallest most-likely set with mass >= top_p; 1.0 = off.
    top_p: float = 1.0
    # Keep tokens with p >= min_p * max p; 0.0 = off.
    min_p: float = 0.0
    # HF-style multiplicative penalty over prompt + output tokens; 1.0 = off.
    repetition_penalty: float = 1.0
    # OpenAI-style additive penalties over output tokens; 0.0 = off.
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    # Seed of the request's sampling stream; None = drawn by the engine at admission.
    seed: int | None = None
    # Stop strings (not included in the text unless include_stop_str_in_output).
    stop: tuple[str, ...] = field(default_factory=tuple)
    # Token ids that end the request (included in the output token ids).
    stop_token_ids: tuple[int, ...] = field(default_factory=tuple)
    # Keep generating past EOS.
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    # Top-N alternatives per generated token (same mode as the token's logprob).
    logprobs: int | None = None
    # Top-N alternatives per prompt token; 0 = only the prompt tokens' own (raw) logprobs.
    prompt_logprobs: int | None = None
    # What a token's logprob means: "processed" (sampled distribution) or "raw" (model).
    logprobs_mode: LogprobsMode = "processed"
    # Also return raw logprob and log kept mass per token (to reconcile the two modes).
    return_raw_logprob: bool = False
    return_log_kept_mass: bool = False
    skip_special_tokens: bool = True
    # Salts the request's prefix-cache hashes: only requests with the same salt share cached KV
    # (vLLM's cache_salt, for isolating tenants or experiments). Outputs never depend on it.
    cache_salt: str | None = None
    # Structured output: the grammar the output must match (None = free text).
    structured: StructuredSpec | None = None

    def __post_init__(self) -> None:
        # Accept lists from callers, store tuples (hashable, immutable).
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        else:
            object.__setattr__(self, "stop", tuple(self.stop or ()))
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids or ()))
        self.validate()

    def validate(self, vocab_size: int | None = None) -> None:
        """Raise InvalidRequestError on a value the engine cannot honour."""
        _check_int(self.max_tokens, "max_tokens", lo=0)
        _check_int(self.min_tokens, "min_tokens", lo=0)
        if self.min_tokens > self.max_tokens:
            raise InvalidRequestError("min_tokens must not exceed max_tokens", "min_tokens")
        _check_float(self.temperature, "temperature", lo=0.0)
        _check_int(self.top_k, "top_k", lo=-1)
        _check_float(self.top_p, "top_p")
        if not 0.0 < self.top_p <= 1.0:
            raise InvalidRequestError(f"top_p must be in (0, 1], got {self.top_p}", "top_p")
        _check_float(self.min_p, "min_p")
        if not 0.0 <= self.min_p <= 1.0:
            raise InvalidRequestError(f"min_p must be in [0, 1], got {self.min_p}", "min_p")
        _check_float(self.repetition_penalty, "repetition_penalty")
        if self.repetition_penalty <= 0.0:
            raise InvalidRequestError("repetition_penalty must be positive", "repetition_penalty")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            _check_float(value, name)
            if not -2.0 <= value <= 2.0:
                raise InvalidRequestError(f"{name} must be in [-2, 2], got {value}", name)
        if self.seed is not None:
            _check_int(self.seed, "seed")
        for s in self.stop:
            if not isinstance(s, str) or not s:
                raise InvalidRequestError("stop must be non-empty strings", "stop")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None:
                _check_int(value, name, lo=0, hi=MAX_TOP_LOGPROBS)
        if self.logprobs_mode not in ("processed", "raw"):
            raise InvalidRequestError(
                f"logprobs_mode must be 'processed' or 'raw', got {self.logprobs_mode!r}", "logprobs_mode"
            )
        if self.cache_salt is not None and not isinstance(self.cache_salt, str):
            raise InvalidRequestError("cache_salt must be a string", "cache_salt")
        if self.structured is not None and not isinstance(self.structured, StructuredSpec):
            raise InvalidRequestError("structured must be a StructuredSpec", "structured")
        for t in self.stop_token_ids:
            _check_int(t, "stop_token_ids", lo=0, hi=None if vocab_size is None else vocab_size - 1)

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE

    @property
    def top_k_active(self) -> bool:
        return self.top_k > 0

    @property
    def penalized(self) -> bool:
        """Some penalty changes the logits (logprobs.apply_penalties)."""
        return self.repetition_penalty != 1.0 or self.frequency_penalty != 0.0 or self.presence_penalty != 0.0

    @property
    def filtered(self) -> bool:
        """top-k, top-p or min-p narrows the support (logprobs.support_mask)."""
        return self.top_k_active or self.top_p < 1.0 or self.min_p > 0.0

    def with_options(self, **changes: object) -> SamplingParams:
        return replace(self, **changes)  # type: ignore[arg-type]


def _check_int(value: object, name: str, lo: int | None = None, hi: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidRequestError(f"{name} must be an integer, got {value!r}", name)
    if lo is not None and value < lo:
        raise InvalidRequestError(f"{name} must be >= {lo}, got {value}", name)
    if hi is not None and value > hi:
        raise InvalidRequestError(f"{name} must be <= {hi}, got {value}", name)


def _check_float(value: object, name: str, lo: float | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidRequestError(f"{name} must be a number, got {value!r}", name)
    if value != value or value in (float("inf"), float("-inf")):
        raise InvalidRequestError(f"{name} must be finite, got {value}", name)
    if lo is not None and value < lo:
        raise InvalidRequestError(f"{name} must be >= {lo}, got {value}", name)
