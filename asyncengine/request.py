"""A request's state inside the engine; every status change is a method here."""
from __future__ import annotations

import enum
import time
from typing import TYPE_CHECKING

from asyncengine.outputs import FinishReason, PromptLogprobs, SampleResult, TopLogprobs
from asyncengine.sampling_params import SamplingParams

if TYPE_CHECKING:
    from asyncengine.structured.state import GrammarState


class RequestStatus(enum.IntEnum):
    """Ordered so that `is_finished` is one comparison."""

    WAITING = 0
    RUNNING = 1
    PREEMPTED = 2
    FINISHED_STOPPED = 3
    FINISHED_LENGTH = 4
    FINISHED_ABORTED = 5
    FINISHED_ERROR = 6

    @property
    def is_finished(self) -> bool:
        return self >= RequestStatus.FINISHED_STOPPED

    @property
    def finish_reason(self) -> FinishReason | None:
        return _FINISH_REASONS.get(self)


_FINISH_REASONS: dict[RequestStatus, FinishReason] = {
    RequestStatus.FINISHED_STOPPED: "stop",
    RequestStatus.FINISHED_LENGTH: "length",
    RequestStatus.FINISHED_ABORTED: "abort",
    RequestStatus.FINISHED_ERROR: "error",
}


class Request:
    """Prompt, outputs so far and progress of one sequence."""

    def __init__(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, seed: int) -> None:
        self.request_id = request_id
        self.prompt_token_ids = list(prompt_token_ids)
        self.params = params
        # The sampling stream is a function of (seed, output index) only.
        self.seed = seed
        self.arrival_time = time.monotonic()
        self.status = RequestStatus.WAITING
        # Prompt followed by outputs; the KV cache holds the first num_computed_tokens.
        self.all_token_ids = list(prompt_token_ids)
        self.num_computed_tokens = 0
        # Tokens served from the prefix cache at (first) admission.
        self.num_cached_tokens = 0
        self.stop_reason: str | int | None = None
        # (code, message) once the request failed inside the engine (FINISHED_ERROR).
        self.error: tuple[str, str] | None = None
        # Weight version the request's current KV was computed with (prefix-hash salt).
        self.kv_weight_version = 0
        # [start, end, version]: positions start..end-1 got their KV from `version`, in the
        # order computed (merged while contiguous); a preemption's recompute starts again
        # at 0, a keep-mode update starts a new entry where it happened.
        self.kv_epochs: list[list[int]] = []
        # Per output token.
        self.logprobs: list[float] = []
        self.weight_versions: list[int] = []
        self.top_logprobs: list[TopLogprobs] = []
        self.raw_logprobs: list[float] = []
        self.log_kept_mass: list[float] = []
        # Raw prompt logprobs collected so far (position 0 has none).
        self.prompt_logprobs: list[float | None] = [None]
        self.prompt_top_logprobs: list[TopLogprobs | None] = [None]
        self.prompt_logprobs_sent = False
        # How many output tokens / characters have been reported in a RequestOutput.
        self.num_reported_tokens = 0
        # Structured output: the grammar matcher over the tokens sampled so far (None = free).
        self.grammar: GrammarState | None = None

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.all_token_ids) - len(self.prompt_token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.all_token_ids[len(self.prompt_token_ids) :]

    @property
    def wants_prompt_logprobs(self) -> bool:
        return self.params.prompt_logprobs is not None

    @property
    def prompt_logprobs_done(self) -> bool:
        return len(self.prompt_logprobs) >= self.num_prompt_tokens

    @property
    def is_finished(self) -> bool:
        return self.status.is_finished

    def start_running(self, num_cached_tokens: int, weight_version: int) -> None:
        first_admission = self.status == RequestStatus.WAITING
        self.status = RequestStatus.RUNNING
        self.num_computed_tokens = 0
        self.kv_weight_version = weight_version
        self.advance(num_cached_tokens, weight_version)  # prefix hits: KV of this version's salt
        if first_admission:
            self.num_cached_tokens = num_cached_tokens

    def advance(self, num_tokens: int, weight_version: int) -> None:
        """num_tokens more positions have their KV, computed by weight_version."""
        start, self.num_computed_tokens = self.num_computed_tokens, self.num_computed_tokens + num_tokens
        if num_tokens <= 0:
            return
        last = self.kv_epochs[-1] if self.kv_epochs else None
        if last is not None and last[1] == start and last[2] == weight_version:
            last[1] = self.num_computed_tokens
        else:
            self.kv_epochs.append([start, self.num_computed_tokens, weight_version])

    def preempt(self) -> None:
        """KV freed; everything (prompt and outputs so far) is recomputed on readmission."""
        self.status = RequestStatus.PREEMPTED
        self.num_computed_tokens = 0

    def append_sample(self, sample: SampleResult, weight_version: int) -> None:
        self.all_token_ids.append(sample.token_id)
        self.logprobs.append(sample.logprob)
        self.weight_versions.append(weight_version)
        if sample.top_logprobs is not None:
            self.top_logprobs.append(sample.top_logprobs)
        if sample.raw_logprob is not None:
            self.raw_logprobs.append(sample.raw_logprob)
        if sample.log_kept_mass is not None:
            self.log_kept_mass.append(sample.log_kept_mass)

    def append_prompt_logprobs(self, lp: PromptLogprobs) -> None:
        self.prompt_logprobs.extend(lp.logprobs)
        if lp.top_logprobs is not None:
            self.prompt_top_logprobs.extend(lp.top_logprobs)
        else:
            self.prompt_top_logprobs.extend([None] * len(lp.logprobs))

    def finish(self, status: RequestStatus, stop_reason: str | int | None = None) -> None:
        assert status.is_finished
        self.status = status
        self.stop_reason = stop_reason
