"""The synchronous step engine: step() = schedule -> execute -> update."""
from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import Future
from pathlib import Path
from typing import Any, Literal

from asyncengine.block_pool import BlockPool
from asyncengine.checkpoint_info import eos_token_ids, load_tokenizer
from asyncengine.config import EngineConfig, ModelInfo
from asyncengine.detokenizer import IncrementalDetokenizer
from asyncengine.forward_thread import ForwardResult, ForwardThread
from asyncengine.kv_budget import kv_pool_blocks
from asyncengine.kv_cache_manager import KVCacheManager
from asyncengine.model_files import resolve_model
from asyncengine.model_runner import ModelRunner, load_model
from asyncengine.outputs import ModelRunnerOutput, RequestOutput, ScheduledRequest, SchedulerOutput
from asyncengine.reliability.faults import FaultHook
from asyncengine.reliability.isolation import execute_isolated
from asyncengine.request import Request, RequestStatus
from asyncengine.sampling_params import InvalidRequestError, SamplingParams
from asyncengine.scheduler import Scheduler
from asyncengine.structured.manager import StructuredOutputs
from kernels import host_heap


UpdateMode = Literal["keep", "recompute", "abort"]
# A committed request's output to build: its request and detokenizer, or built already (a failure).
_Pending = RequestOutput | tuple[Request, IncrementalDetokenizer | None]


class EngineOverloadedError(RuntimeError):
    """The waiting queue is full; retry later."""


class _RequestFault(Exception):
    """One request failed while its step's output was applied (code, message)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class EngineCore:
    def __init__(self, config: EngineConfig, tokenizer: Any | None = None, faults: FaultHook | None = None) -> None:
        import torch

        if config.num_threads is not None:
            torch.set_num_threads(config.num_threads)
        if config.retain_host_heap and config.device == "cpu":
            host_heap.retain()
        self.config = config
        self.model_dir: Path = resolve_model(config.model)
        self.model, hf_config = load_model(self.model_dir, config)
        self.tokenizer = tokenizer if tokenizer is not None else load_tokenizer(self.model_dir)
        args = self.model.args
        max_len = min(config.max_model_len or args.max_position_embeddings, args.max_position_embeddings)
        self.model_info = ModelInfo(
            num_layers=args.num_layers,
            num_kv_heads=args.num_kv_heads,
            head_dim=args.head_dim,
            vocab_size=args.vocab_size,
            max_model_len=max_len,
            eos_token_ids=eos_token_ids(self.model_dir, hf_config, self.tokenizer),
        )
        per_block = ModelRunner.kv_bytes_per_block(args, config.block_size, config.dtype)
        num_blocks = kv_pool_blocks(config, per_block, max_len)
        cap = int(config.session_kv_fraction * num_blocks)  # live sessions' blocks evicted last, up to this
        self.pool = BlockPool(num_blocks, config.enable_prefix_caching, cap)
        self.kv = KVCacheManager(self.pool, config.block_size)
        self.scheduler = Scheduler(config, self.kv, max_len)
        # Test hook injecting faults (asyncengine/reliability/faults.py); None in production.
        self.faults = faults
        self.runner = ModelRunner(self.model, config, num_blocks, faults)
        self.requests: dict[str, Request] = {}
        self.detokenizers: dict[str, IncrementalDetokenizer] = {}
        self.weight_version = 0
        self._seeds = random.Random(config.seed)
        self.structured = StructuredOutputs(self.tokenizer, args.vocab_size, self.model_info.eos_token_ids)
        self.num_steps = 0
        # Requests finished with "abort", failed inside the engine, expired in the queue.
        self.num_aborted = 0
        self.num_failed = 0
        self.num_queue_timeouts = 0
        # Async scheduling: the forward thread, the step between begin_step and end_step
        # (its future when on the forward thread), and the committed step's outputs to build.
        self._forward = ForwardThread(self.runner) if config.async_scheduling else None
        self._inflight: tuple[SchedulerOutput, Future[ForwardResult] | None] | None = None
        self._pending: list[_Pending] = []

    # -- requests ---------------------------------------------------------------------
    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams) -> None:
        """Validate and queue a request; raises InvalidRequestError or EngineOverloadedError."""
        self._validate(request_id, prompt_token_ids, params)
        if len(self.scheduler.waiting) >= self.config.max_waiting:
            raise EngineOverloadedError("the waiting queue is full")
        seed = params.seed if params.seed is not None else self._seeds.getrandbits(63)
        req = Request(request_id, prompt_token_ids, params, seed)
        req.grammar = self.structured.start(params.structured)  # compiled (cached) or InvalidRequestError
        self.requests[request_id] = req
        if self.tokenizer is not None:
            self.detokenizers[request_id] = IncrementalDetokenizer(
                self.tokenizer, req.prompt_token_ids, params.stop, params.include_stop_str_in_output,
                params.skip_special_tokens,
            )
        self.scheduler.add(req)

    def encode(self, prompt: str | list[int]) -> list[int]:
        """Token ids of a prompt given as text (with the tokenizer's special tokens) or ids."""
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise InvalidRequestError("text prompts need a tokenizer; pass token ids", "prompt")
            return list(self.tokenizer.encode(prompt, add_special_tokens=True))
        return list(prompt)

    def _validate(self, request_id: str, prompt: list[int], params: SamplingParams) -> None:
        info = self.model_info
        if request_id in self.requests:
            raise InvalidRequestError(f"request id {request_id!r} is already in use", "request_id")
        if not prompt:
            raise InvalidRequestError("the prompt is empty", "prompt")
        if any(isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < info.vocab_size for t in prompt):
            raise InvalidRequestError(f"prompt token ids must be integers in [0, {info.vocab_size})", "prompt")
        params.validate(info.vocab_size)
        total = len(prompt) + params.max_tokens
        if total > info.max_model_len:
            raise InvalidRequestError(
                f"This model's maximum context length is {info.max_model_len} tokens. However, you requested "
                f"{total} tokens ({len(prompt)} in the prompt, {params.max_tokens} for the completion).",
                "max_tokens" if len(prompt) < info.max_model_len else "prompt",
            )
        capacity = self.pool.num_blocks * self.config.block_size
        if total > capacity:
            raise InvalidRequestError(f"the request needs {total} tokens of KV cache; the pool holds {capacity}")
        if params.stop and self.tokenizer is None:
            raise InvalidRequestError("stop strings need a tokenizer; this model has none", "stop")

    def abort(self, request_ids: Iterable[str]) -> list[RequestOutput]:
        """Finish the given requests with finish_reason "abort"; unknown ids are ignored.
        The outputs not yet returned (async scheduling) come first."""
        outs = self.flush()
        for rid in request_ids:
            req = self.requests.get(rid)
            if req is None or req.is_finished:
                continue
            self.scheduler.finish(req, RequestStatus.FINISHED_ABORTED)
            outs.append(self._make_output(req, self.detokenizers.get(rid)))
            self._forget(req)
            self.num_aborted += 1
        return outs

    def expire_waiting(self) -> list[RequestOutput]:
        """Fail the requests that waited over max_queue_seconds without ever being scheduled."""
        limit = self.config.max_queue_seconds
        if limit is None or not self.scheduler.waiting:
            return []
        now = time.monotonic()
        late = [r for r in self.scheduler.waiting if r.status == RequestStatus.WAITING and now - r.arrival_time > limit]
        return [self._fail(r, "queue_timeout", f"the request waited {now - r.arrival_time:.2f} s in the queue, "
                                               f"over max_queue_seconds={limit}") for r in late]

    def _fail(
        self, req: Request, code: str, message: str, detok: IncrementalDetokenizer | None = None
    ) -> RequestOutput:
        """Finish a request with an error (also one that flush() finds broken after its
        stop): its blocks are freed, and the KV of the step that failed never enters the
        prefix cache."""
        detok = detok or self.detokenizers.get(req.request_id)
        self.scheduler.finish(req, RequestStatus.FINISHED_ERROR)
        req.error = (code, message)
        out = self._make_output(req, detok)
        out.error, out.error_code = message, code
        self._forget(req)
        if code == "queue_timeout":
            self.num_queue_timeouts += 1
        else:
            self.num_failed += 1
        return out

    def has_unfinished(self) -> bool:
        """Requests to run, or outputs of a committed step not yet returned."""
        return self.scheduler.has_unfinished() or bool(self._pending)

    # -- the step ---------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """schedule -> execute -> commit -> outputs. With async_scheduling the outputs are
        the previous step's, built while this step's forward ran; the last ones come from
        a step() with nothing left to schedule (has_unfinished() counts them)."""
        outputs = self.begin_step()
        self.end_step()
        return outputs if self.config.async_scheduling else outputs + self.flush()

    def begin_step(self) -> list[RequestOutput]:
        """Schedule a step and start its forward (on the forward thread with async
        scheduling, else in end_step); return the outputs not yet returned, built meanwhile."""
        self.num_steps += 1
        if self.faults is not None:
            self.faults.before_step(self.num_steps)
        expired = self.expire_waiting()
        sched = self.scheduler.schedule()
        future = self._forward.submit(sched) if self._forward is not None and sched.scheduled else None
        self._inflight = (sched, future)
        return expired + self.flush()

    def end_step(self) -> None:
        """Wait for the step's forward and commit it: tokens appended, stops decided,
        finished requests' blocks freed. Its outputs are built by the next flush()."""
        assert self._inflight is not None, "end_step() without begin_step()"
        sched, future = self._inflight
        self._inflight = None
        # A request whose forward fails (or whose logits are not finite) fails alone.
        runner_out, forward_failed = future.result() if future is not None else execute_isolated(self.runner, sched)
        failed = {rid: ("nonfinite_logits", msg) for rid, msg in runner_out.failed.items()}
        failed.update((rid, ("forward_error", msg)) for rid, msg in forward_failed.items())
        self._pending = self._commit(sched, runner_out, failed)

    def flush(self) -> list[RequestOutput]:
        """The committed step's outputs not yet returned (detokenized here for requests
        without stop strings). A request whose text fails now fails here, one step late
        for scheduling (the next step may have computed it: that token is discarded)."""
        pending, self._pending = self._pending, []
        outputs = []
        for item in pending:
            if isinstance(item, RequestOutput):
                outputs.append(item)
                continue
            req, detok = item
            if detok is not None and not req.params.stop:
                try:
                    for token in req.all_token_ids[req.num_prompt_tokens + req.num_reported_tokens :]:
                        self._detokenize(req, detok, token)
                except _RequestFault as exc:
                    outputs.append(self._fail(req, exc.code, str(exc), detok))
                    continue
            outputs.append(self._make_output(req, detok))
        return outputs

    def _commit(
        self, sched: SchedulerOutput, out: ModelRunnerOutput, failed: dict[str, tuple[str, str]]
    ) -> list[_Pending]:
        pending: list[_Pending] = []
        for s in sched.scheduled:
            req = s.request
            if req.is_finished:  # failed or aborted while its forward ran: nothing of it is kept
                continue
            if req.request_id in failed:
                pending.append(self._fail(req, *failed[req.request_id]))
                continue
            try:
                item = self._commit_one(s, req, out)
            except _RequestFault as exc:
                pending.append(self._fail(req, exc.code, str(exc)))
                continue
            if item is not None:
                pending.append(item)
        return pending

    def _commit_one(self, s: ScheduledRequest, req: Request, out: ModelRunnerOutput) -> _Pending | None:
        req.advance(s.num_new_tokens, self.weight_version)  # KV of this step's weights
        # Before any finish frees the blocks: finished requests' blocks stay cached.
        self.kv.cache_full_blocks(req, req.kv_weight_version)
        prompt_lp = out.prompt_logprobs.get(req.request_id)
        if prompt_lp is not None:
            req.append_prompt_logprobs(prompt_lp)
        sample = out.samples.get(req.request_id)
        detok = self.detokenizers.get(req.request_id)
        if sample is not None:
            req.append_sample(sample, self.weight_version)
            if req.grammar is not None:
                req.grammar.accept(sample.token_id)
            # Only stop strings need the text to decide a stop: others detokenize in flush().
            self._check_stop(req, sample.token_id, self._detokenize(req, detok, sample.token_id)
                             if detok is not None and req.params.stop else None)
        elif req.params.max_tokens == 0 and req.num_computed_tokens == req.num_tokens:
            self.scheduler.finish(req, RequestStatus.FINISHED_LENGTH)
        if req.is_finished:
            self._forget(req)
        if sample is not None or req.is_finished or (req.prompt_logprobs_done and not req.prompt_logprobs_sent
                                                     and req.wants_prompt_logprobs):
            return (req, detok)
        return None

    def _detokenize(self, req: Request, detok: IncrementalDetokenizer, token: int) -> str | None:
        """Feed one output token; returns the stop string it completed, if any."""
        try:
            if self.faults is not None:
                self.faults.before_detokenize(req.request_id)
            return detok.add(token)
        except Exception as exc:  # this request's text is broken: it fails, the batch goes on
            raise _RequestFault("detokenizer_error", f"detokenizing the output failed: {exc!r}") from exc

    def _check_stop(self, req: Request, token: int, stop_str: str | None) -> None:
        sp = req.params
        # EOS and stop tokens do not end a request before min_tokens outputs.
        can_stop = req.num_output_tokens >= sp.min_tokens
        if can_stop and not sp.ignore_eos and token in self.model_info.eos_token_ids:
            self.scheduler.finish(req, RequestStatus.FINISHED_STOPPED)
        elif req.grammar is not None and req.grammar.is_done:  # the grammar ended: nothing may follow
            self.scheduler.finish(req, RequestStatus.FINISHED_STOPPED)
        elif can_stop and token in sp.stop_token_ids:
            self.scheduler.finish(req, RequestStatus.FINISHED_STOPPED, token)
        elif stop_str is not None:
            self.scheduler.finish(req, RequestStatus.FINISHED_STOPPED, stop_str)
        elif req.num_output_tokens >= sp.max_tokens or req.num_tokens >= self.model_info.max_model_len:
            self.scheduler.finish(req, RequestStatus.FINISHED_LENGTH)

    def _make_output(self, req: Request, detok: IncrementalDetokenizer | None) -> RequestOutput:
        lo = req.num_reported_tokens
        hi = req.num_output_tokens
        req.num_reported_tokens = hi
        sp = req.params
        out = RequestOutput(
            request_id=req.request_id,
            token_ids=req.output_token_ids[lo:hi],
            logprobs=req.logprobs[lo:hi],
            weight_versions=req.weight_versions[lo:hi],
            kv_epochs=[(a, b, v) for a, b, v in req.kv_epochs] if req.is_finished else None,
            text=detok.take(req.is_finished) if detok is not None else "",
            top_logprobs=req.top_logprobs[lo:hi] if sp.logprobs is not None else None,
            raw_logprobs=req.raw_logprobs[lo:hi] if sp.return_raw_logprob else None,
            log_kept_mass=req.log_kept_mass[lo:hi] if sp.return_log_kept_mass else None,
            finished=req.is_finished,
            finish_reason=req.status.finish_reason,
            stop_reason=req.stop_reason,
            num_prompt_tokens=req.num_prompt_tokens,
            num_output_tokens=hi,
            num_cached_tokens=req.num_cached_tokens,
        )
        if req.wants_prompt_logprobs and req.prompt_logprobs_done and not req.prompt_logprobs_sent:
            req.prompt_logprobs_sent = True
            out.prompt_logprobs = req.prompt_logprobs[: req.num_prompt_tokens]
            out.prompt_top_logprobs = req.prompt_top_logprobs[: req.num_prompt_tokens]
        return out

    def _forget(self, req: Request) -> None:
        self.requests.pop(req.request_id, None)
        self.detokenizers.pop(req.request_id, None)

    # -- weights, cache and stats ------------------------------------------------------
    def update_weights(
        self, state: Mapping[str, Any], mode: UpdateMode = "keep", *, partial: bool = False
    ) -> list[RequestOutput]:
        """Swap in new HF-named weights between two steps (the caller's step boundary).

        All tensors are checked before any is written (WeightLoadError leaves the old
        weights and version serving). Then the version goes up by one, the prefix cache
        is dropped, and in-flight requests are treated per `mode`: keep (continue on
        their KV), recompute (KV freed and recomputed with the new weights), abort
        (finished with "abort"; their final outputs are returned).
        """
        from asyncengine.models.weights import load_weights

        return self.apply_weights(lambda: load_weights(self.model, state, partial=partial), mode)

    def apply_weights(self, write: Callable[[], None], mode: UpdateMode = "keep") -> list[RequestOutput]:
        """update_weights with the writing done by `write()` (it raises to refuse, changing
        nothing): e.g. a swap of weights staged aside (asyncengine/rl/staging.py)."""
        if mode not in ("keep", "recompute", "abort"):
            raise InvalidRequestError(f"mode must be keep, recompute or abort, got {mode!r}", "mode")
        if self._inflight is not None:  # a step boundary is after the step in flight, never inside it
            raise RuntimeError("weights can change only between end_step() and begin_step()")
        earlier = self.flush()  # the previous step's outputs carry its weight version
        write()
        self.weight_version += 1
        if not self.config.unsafe_keep_prefix_cache_across_updates:
            self.scheduler.weight_version = self.weight_version  # the prefix-hash salt
            self.reset_prefix_cache()
        if mode == "abort":
            return earlier + self.abort(list(self.requests))
        if mode == "recompute":
            self.scheduler.preempt_all()
        return earlier

    def weight_checksums(self) -> dict[str, str]:
        """sha256 per HF tensor name, of the weights as the engine holds them."""
        from asyncengine.models.weights import weight_checksums

        return weight_checksums(self.model)

    def reset_prefix_cache(self) -> None:
        self.scheduler.reset_prefix_cache()

    def close(self) -> None:
        """Stop the forward thread (async scheduling); the engine must not step after."""
        if self._forward is not None:
            self._forward.close()

    def stats(self) -> dict[str, float]:
        kv = self.kv
        return {
            "num_running": len(self.scheduler.running),
            "num_waiting": len(self.scheduler.waiting),
            "kv_usage": self.pool.usage,
            "num_free_blocks": self.pool.num_free_blocks,
            "num_protected_blocks": self.pool.num_protected_blocks,
            "num_total_blocks": self.pool.num_blocks,
            "prefix_query_tokens": kv.num_query_tokens,
            "prefix_hit_tokens": kv.num_hit_tokens,
            "num_preemptions": self.scheduler.num_preemptions,
            "weight_version": self.weight_version,
            "num_cached_blocks": self.pool.num_cached_blocks,
            "num_aborted": self.num_aborted,
            "num_failed": self.num_failed,
            "num_queue_timeouts": self.num_queue_timeouts,
        }
