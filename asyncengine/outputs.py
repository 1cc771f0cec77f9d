"""Dataclasses that cross the engine's boundaries. No tensors cross the scheduler boundary."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from asyncengine.request import Request

FinishReason = Literal["stop", "length", "abort", "error"]
# A top-N entry: (token_id, logprob), sorted by logprob descending, ties by lower token id.
TopLogprobs = list[tuple[int, float]]


@dataclass(slots=True)
class ScheduledRequest:
    # The request (read-only for the model runner: prompt, outputs, params, seed).
    request: Request
    # Position of the first token computed this step (= tokens already in the KV cache).
    start: int
    # How many tokens this step computes for the request.
    num_new_tokens: int
    # Block ids holding the request's KV, in order (covers start + num_new_tokens).
    block_ids: list[int]
    # True when this chunk reaches the last known token: the runner samples the next token.
    sample: bool
    # Prompt positions [lo, hi) whose next-token raw logprobs this step returns.
    prompt_logprob_range: tuple[int, int] | None = None


@dataclass(slots=True)
class SchedulerOutput:
    # Requests computed this step, in batch order.
    scheduled: list[ScheduledRequest]
    # Total tokens computed this step (sum of num_new_tokens), within the token budget.
    num_batched_tokens: int
    # Requests preempted (KV freed, to be recomputed) while scheduling this step.
    preempted_ids: list[str] = field(default_factory=list)


@dataclass(slots=True)
class SampleResult:
    # The sampled token.
    token_id: int
    # Its logprob in the request's logprobs_mode.
    logprob: float
    # Top-N alternatives in the same mode (None when not requested).
    top_logprobs: TopLogprobs | None = None
    # log_softmax(z)[t] when return_raw_logprob.
    raw_logprob: float | None = None
    # logsumexp(z'[S]) - logsumexp(z') when return_log_kept_mass.
    log_kept_mass: float | None = None


@dataclass(slots=True)
class PromptLogprobs:
    # Raw logprob of each prompt token in the returned range (predicted from the previous one).
    logprobs: list[float]
    # Top-N raw alternatives per position (None when prompt_logprobs == 0).
    top_logprobs: list[TopLogprobs] | None = None


@dataclass(slots=True)
class ModelRunnerOutput:
    # request_id -> sampled token of requests whose chunk reached the end.
    samples: dict[str, SampleResult]
    # request_id -> prompt logprobs computed this step.
    prompt_logprobs: dict[str, PromptLogprobs]
    # request_id -> why its rows of this step failed (non-finite logits); no sample for it.
    failed: dict[str, str] = field(default_factory=dict)


@dataclass(slots=True)
class RequestOutput:
    """What one step produced for one request: a delta, never the whole history."""

    request_id: str
    # New output tokens this step (usually 1; 0 for a step that only advanced the prompt).
    token_ids: list[int]
    # Their logprobs in the request's mode; parallel to token_ids.
    logprobs: list[float]
    # Version of the weights that produced each new token.
    weight_versions: list[int]
    # On the final output: (start, end, version) runs of KV positions in the order they were
    # computed (Request.kv_epochs): what an exact recompute replays (asyncengine/rl/recompute.py).
    kv_epochs: list[tuple[int, int, int]] | None = None
    # New text since the previous output (incremental, never splits a character).
    text: str = ""
    top_logprobs: list[TopLogprobs] | None = None
    raw_logprobs: list[float] | None = None
    log_kept_mass: list[float] | None = None
    # Raw prompt logprobs, sent once when the prompt is done (first entry None: no context).
    prompt_logprobs: list[float | None] | None = None
    prompt_top_logprobs: list[TopLogprobs | None] | None = None
    finished: bool = False
    finish_reason: FinishReason | None = None
    # The stop string or stop token id that ended the request, if any.
    stop_reason: str | int | None = None
    # Usage counters (totals so far).
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0
    num_cached_tokens: int = 0
    # finish_reason "error": what failed (error_code names it: forward_error,
    # nonfinite_logits, detokenizer_error, queue_timeout); AsyncEngine raises it as
    # RequestFailedError on the request's stream.
    error: str | None = None
    error_code: str | None = None


@dataclass(slots=True)
class CompletionResult:
    """A finished request, accumulated from its deltas (what LLM.generate returns)."""

    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    weight_versions: list[int] = field(default_factory=list)
    kv_epochs: list[tuple[int, int, int]] | None = None
    text: str = ""
    top_logprobs: list[TopLogprobs] | None = None
    raw_logprobs: list[float] | None = None
    log_kept_mass: list[float] | None = None
    prompt_logprobs: list[float | None] | None = None
    prompt_top_logprobs: list[TopLogprobs | None] | None = None
    finish_reason: FinishReason | None = None
    stop_reason: str | int | None = None
    num_cached_tokens: int = 0

    def add(self, out: RequestOutput) -> None:
        """Append one delta."""
        self.token_ids.extend(out.token_ids)
        self.logprobs.extend(out.logprobs)
        self.weight_versions.extend(out.weight_versions)
        self.text += out.text
        for name in ("top_logprobs", "raw_logprobs", "log_kept_mass"):
            delta = getattr(out, name)
            if delta is not None:
                if getattr(self, name) is None:
                    setattr(self, name, [])
                getattr(self, name).extend(delta)
        if out.prompt_logprobs is not None:
            self.prompt_logprobs = out.prompt_logprobs
            self.prompt_top_logprobs = out.prompt_top_logprobs
        if out.kv_epochs is not None:
            self.kv_epochs = out.kv_epochs
        if out.finished:
            self.finish_reason = out.finish_reason
            self.stop_reason = out.stop_reason
        self.num_cached_tokens = out.num_cached_tokens
