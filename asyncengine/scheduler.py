"""Continuous batching under a token budget, with chunked prefill and preemption.

There are no prefill/decode modes: each request has num_computed_tokens of num_tokens
in the KV cache, and a step gives it some new tokens under one budget. Running
requests go first (oldest first); when blocks run out the newest running request is
preempted (its KV freed, recomputed later). Waiting requests are admitted in order.
"""
from __future__ import annotations

from collections import deque

from asyncengine.config import EngineConfig
from asyncengine.kv_cache_manager import KVCacheManager
from asyncengine.outputs import ScheduledRequest, SchedulerOutput
from asyncengine.request import Request, RequestStatus


class Scheduler:
    def __init__(self, config: EngineConfig, kv: KVCacheManager, max_model_len: int) -> None:
        self.config = config
        self.kv = kv
        self.max_model_len = max_model_len
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        # Salt for prefix-cache hashes: the current weight version.
        self.weight_version = 0
        self.num_preemptions = 0

    def add(self, request: Request) -> None:
        self.waiting.append(request)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput:
        budget = self.config.max_num_batched_tokens
        scheduled: list[ScheduledRequest] = []
        preempted: list[str] = []
        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            num_new = self._num_new_tokens(req, budget)
            if num_new == 0:
                i += 1
                continue
            while not self.kv.allocate_slots(req, num_new):
                victim = self.running.pop()
                self._preempt(victim)
                preempted.append(victim.request_id)
                if victim is req:
                    break
            else:
                scheduled.append(self._scheduled(req, num_new))
                budget -= num_new
                i += 1
        if not preempted:
            budget = self._admit(budget, scheduled)
        total = sum(s.num_new_tokens for s in scheduled)
        return SchedulerOutput(scheduled=scheduled, num_batched_tokens=total, preempted_ids=preempted)

    def _admit(self, budget: int, scheduled: list[ScheduledRequest]) -> int:
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            req = self.waiting[0]
            hits = self.kv.get_computed_blocks(req, self.weight_version)
            num_cached = len(hits) * self.kv.block_size
            num_new = req.num_tokens - num_cached
            if not self.config.enable_chunked_prefill and num_new > budget:
                break
            num_new = min(num_new, budget)
            if not self.kv.allocate_slots(req, num_new, hits):
                break
            self.waiting.popleft()
            req.start_running(num_cached, self.weight_version)
            self.running.append(req)
            scheduled.append(self._scheduled(req, num_new))
            budget -= num_new
        return budget

    def _num_new_tokens(self, req: Request, budget: int) -> int:
        remaining = req.num_tokens - req.num_computed_tokens
        if not self.config.enable_chunked_prefill and remaining > budget:
            return 0
        return min(remaining, budget)

    def _scheduled(self, req: Request, num_new: int) -> ScheduledRequest:
        start = req.num_computed_tokens
        end = start + num_new
        plp = None
        if req.wants_prompt_logprobs and not req.prompt_logprobs_done:
            # Hidden state at position p scores prompt token p + 1.
            lo = max(start, len(req.prompt_logprobs) - 1)
            hi = min(end, req.num_prompt_tokens - 1)
            plp = (lo, hi) if hi > lo else None
        return ScheduledRequest(
            request=req,
            start=start,
            num_new_tokens=num_new,
            block_ids=self.kv.block_ids(req.request_id),
            sample=end == req.num_tokens and req.params.max_tokens > 0,
            prompt_logprob_range=plp,
        )

    def _preempt(self, req: Request) -> None:
        self.kv.free(req)
        req.preempt()
        self.waiting.appendleft(req)
        self.num_preemptions += 1

    def preempt_all(self) -> None:
        """Preempt every running request (oldest ends up first in the waiting queue)."""
        while self.running:
            self._preempt(self.running.pop())

    def finish(self, req: Request, status: RequestStatus, stop_reason: str | int | None = None) -> None:
        """End a request (any state) and free its blocks."""
        if req.status == RequestStatus.RUNNING:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)
        req.finish(status, stop_reason)
        self.kv.free(req)

    def reset_prefix_cache(self) -> None:
        self.kv.reset_prefix_cache()
