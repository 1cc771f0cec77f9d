"""The synchronous step engine: step() = schedule -> execute -> update."""
from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, Literal

from asyncengine.block_pool import BlockPool
from asyncengine.config import EngineConfig, ModelInfo
from asyncengine.detokenizer import IncrementalDetokenizer
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


UpdateMode = Literal["keep", "recompute", "abort"]


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
        self.config = config
        self.model_dir: Path = resolve_model(config.model)
        self.model, hf_config = load_model(self.model_dir, config)
        self.tokenizer = tokenizer if tokenizer is not None else _load_tokenizer(self.model_dir)
        args = self.model.args
        max_len = min(config.max_model_len or args.max_position_embeddings, args.max_position_embeddings)
        self.model_info = ModelInfo(
            num_layers=args.num_layers,
            num_kv_heads=args.num_kv_heads,
            head_dim=args.head_dim,
            vocab_size=args.vocab_size,
            max_model_len=max_len,
            eos_token_ids=_eos_ids(self.model_dir, hf_config, self.tokenizer),
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
        """Finish the given requests with finish_reason "abort"; unknown ids are ignored."""
        outs = []
        for rid in request_ids:
            req = self.requests.get(rid)
            if req is None or req.is_finished:
                continue
            self.scheduler.finish(req, RequestStatus.FINISHED_ABORTED)
            outs.append(self._make_output(req))
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

    def _fail(self, req: Request, code: str, message: str) -> RequestOutput:
        """Finish a request with an error: its blocks are freed, and the KV of the step that
        failed never enters the prefix cache."""
        self.scheduler.finish(req, RequestStatus.FINISHED_ERROR)
        req.error = (code, message)
        out = self._make_output(req)
        out.error, out.error_code = message, code
        self._forget(req)
        if code == "queue_timeout":
            self.num_queue_timeouts += 1
        else:
            self.num_failed += 1
        return out

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    # -- the step ---------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        self.num_steps += 1
        if self.faults is not None:
            self.faults.before_step(self.num_steps)
        expired = self.expire_waiting()
        sched = self.scheduler.schedule()
        # A request whose forward fails (or whose logits are not finite) fails alone.
        runner_out, forward_failed = execute_isolated(self.runner, sched)
        failed = {rid: ("nonfinite_logits", msg) for rid, msg in runner_out.failed.items()}
        failed.update((rid, ("forward_error", msg)) for rid, msg in forward_failed.items())
        return expired + self._update(sched, runner_out, failed)

    def _update(
        self, sched: SchedulerOutput, out: ModelRunnerOutput, failed: dict[str, tuple[str, str]]
    ) -> list[RequestOutput]:
        outputs = []
        for s in sched.scheduled:
            req = s.request
            if req.request_id in failed:
                outputs.append(self._fail(req, *failed[req.request_id]))
                continue
            try:
                self._update_one(s, req, out, outputs)
            except _RequestFault as exc:
                outputs.append(self._fail(req, exc.code, str(exc)))
        return outputs

    def _update_one(
        self, s: ScheduledRequest, req: Request, out: ModelRunnerOutput, outputs: list[RequestOutput]
    ) -> None:
        req.advance(s.num_new_tokens, self.weight_version)  # KV of this step's weights
        # Before any finish frees the blocks: finished requests' blocks stay cached.
        self.kv.cache_full_blocks(req, req.kv_weight_version)
        prompt_lp = out.prompt_logprobs.get(req.request_id)
        if prompt_lp is not None:
            req.append_prompt_logprobs(prompt_lp)
        sample = out.samples.get(req.request_id)
        if sample is not None:
            req.append_sample(sample, self.weight_version)
            if req.grammar is not None:
                req.grammar.accept(sample.token_id)
            self._check_stop(req, sample.token_id)
        elif req.params.max_tokens == 0 and req.num_computed_tokens == req.num_tokens:
            self.scheduler.finish(req, RequestStatus.FINISHED_LENGTH)
        if sample is not None or req.is_finished or (req.prompt_logprobs_done and not req.prompt_logprobs_sent
                                                     and req.wants_prompt_logprobs):
            outputs.append(self._make_output(req))
        if req.is_finished:
            self._forget(req)

    def _check_stop(self, req: Request, token: int) -> None:
        sp = req.params
        detok = self.detokenizers.get(req.request_id)
        try:
            if self.faults is not None:
                self.faults.before_detokenize(req.request_id)
            stop_str = detok.add(token) if detok is not None else None
        except Exception as exc:  # this request's text is broken: it fails, the batch goes on
            raise _RequestFault("detokenizer_error", f"detokenizing the output failed: {exc!r}") from exc
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

    def _make_output(self, req: Request) -> RequestOutput:
        lo = req.num_reported_tokens
        hi = req.num_output_tokens
        req.num_reported_tokens = hi
        sp = req.params
        detok = self.detokenizers.get(req.request_id)
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
        write()
        self.weight_version += 1
        if not self.config.unsafe_keep_prefix_cache_across_updates:
            self.scheduler.weight_version = self.weight_version  # the prefix-hash salt
            self.reset_prefix_cache()
        if mode == "abort":
            return self.abort(list(self.requests))
        if mode == "recompute":
            self.scheduler.preempt_all()
        return []

    def weight_checksums(self) -> dict[str, str]:
        """sha256 per HF tensor name, of the weights as the engine holds them."""
        from asyncengine.models.weights import weight_checksums

        return weight_checksums(self.model)

    def reset_prefix_cache(self) -> None:
        self.scheduler.reset_prefix_cache()

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


def _load_tokenizer(model_dir: Path) -> Any | None:
    if not any((model_dir / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_dir))


def _eos_ids(model_dir: Path, hf_config: Any, tokenizer: Any | None) -> tuple[int, ...]:
    ids: set[int] = set()
    for source in (hf_config, _generation_config(model_dir)):
        value = getattr(source, "eos_token_id", None) if source is not None else None
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    if tokenizer is not None and getattr(tokenizer, "eos_token_id", None) is not None:
        ids.add(int(tokenizer.eos_token_id))
    return tuple(sorted(ids))


def _generation_config(model_dir: Path) -> Any | None:
    if not (model_dir / "generation_config.json").exists():
        return None
    from transformers import GenerationConfig

    return GenerationConfig.from_pretrained(str(model_dir))
