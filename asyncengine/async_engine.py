"""AsyncEngine: an actor that feeds the synchronous EngineCore from asyncio.

One inbox of commands, one step loop on a dedicated thread (the only thread that
touches EngineCore, so the event loop stays responsive while a step runs), and
per-request output streams filled through `loop.call_soon_threadsafe`.

Commands are applied at step boundaries, in arrival order, by the handlers in
`AsyncEngine.handlers` (add, abort, reset_prefix_cache, pause, resume, update_weights,
call), submitted with `await engine.submit(kind, payload)`; `call(fn)` runs any fn(core)
between two steps. Because every command runs between two steps on the one engine
thread, a weight swap is atomic (no step mixes versions) and concurrent pause / resume /
update calls are serialized in arrival order.
"""
from __future__ import annotations

import asyncio
import copy
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from pathlib import Path
from typing import Any, Literal, TypeVar

from asyncengine.config import EngineConfig, ModelInfo
from asyncengine.engine_core import EngineCore, EngineOverloadedError
from asyncengine.async_streams import (
    PauseMode, RequestStream, StreamItem, _Add, _Command, _Pause, _post_all, _resolve,
)
from asyncengine.models.weights import read_weight_source
from asyncengine.outputs import RequestOutput
from asyncengine.reliability.errors import request_error
from asyncengine.reliability.faults import FaultHook
from asyncengine.sampling_params import InvalidRequestError, SamplingParams

log = logging.getLogger(__name__)
T = TypeVar("T")
Prompt = str | list[int]
# Called on the engine thread after each step: (seconds, new tokens, requests with output).
StepObserver = Callable[[float, int, int], None]
UpdateMode = Literal["keep", "recompute", "abort"]
# What update_weights takes: a state dict, a safetensors file or directory, or safetensors bytes.
WeightSource = Mapping[str, Any] | str | Path | bytes


class EngineDeadError(RuntimeError):
    """The engine thread stopped (a fatal error in step(), or shutdown)."""


class AsyncEngine:
    """Serve EngineCore to asyncio callers; see the module docstring."""

    def __init__(
        self, core: EngineCore, step_observer: StepObserver | None = None, faults: FaultHook | None = None
    ) -> None:
        self.core = core
        if faults is not None:  # a test hook (reliability/faults.py), never set in production
            core.faults = core.runner.faults = faults
        self.config: EngineConfig = core.config
        self.model_info: ModelInfo = core.model_info
        # The engine thread detokenizes with core.tokenizer; HF fast tokenizers are not
        # safe to share across threads, so the loop side gets its own copy.
        self.tokenizer = copy.deepcopy(core.tokenizer) if core.tokenizer is not None else None
        if core.faults is not None:
            self.tokenizer = core.faults.wrap_tokenizer(self.tokenizer)
        # Requests refused at admission, by reason (loop thread only).
        self.num_rejected: dict[str, int] = {"overloaded": 0, "invalid": 0, "engine_dead": 0}
        self.step_observer = step_observer
        self.num_steps = 0
        self.last_apply_s = 0.0
        self.handlers: dict[str, Callable[[Any], Any]] = {
            "add": self._add, "abort": self._abort,
            "reset_prefix_cache": lambda _: core.reset_prefix_cache(),
            "pause": self._pause, "resume": lambda _: self._resume(),
            "update_weights": self._update_weights, "call": lambda fn: fn(core),
            "apply_weights": self._apply_weights,
        }
        self._cond = threading.Condition(threading.RLock())
        self._inbox: list[_Command] = []
        self._pending_adds = 0  # submitted, not yet applied (for the immediate overload check)
        self._stopping = False
        self._paused = False
        # pause(mode="wait") in progress: adds are held here, waiters settled once drained.
        self._draining = False
        self._held: list[_Add] = []
        self._drain_waiters: list[_Pause] = []
        self._dead: BaseException | None = None
        self._streams: dict[str, RequestStream] = {}  # engine thread only
        self._stats: dict[str, float] = dict(core.stats())
        self.kv_capacity_tokens = int(self._stats["num_total_blocks"]) * core.config.block_size
        self._thread = threading.Thread(target=self._run, name="asyncengine-step", daemon=True)
        self._thread.start()

    @classmethod
    def from_config(
        cls, config: EngineConfig, tokenizer: Any | None = None, faults: FaultHook | None = None
    ) -> AsyncEngine:
        return cls(EngineCore(config, tokenizer, faults))

    # -- public API (event loop thread) -----------------------------------------------
    def encode(self, prompt: Prompt) -> list[int]:
        """Token ids of a text prompt (with special tokens, like LLM.encode) or of ids."""
        return self.core.encode(prompt)

    async def add_request(self, prompt: Prompt, params: SamplingParams, request_id: str | None = None) -> RequestStream:
        """Queue a request and wait until the engine accepted it.

        Raises InvalidRequestError / EngineOverloadedError / EngineDeadError before any output.
        """
        ids = self.encode(prompt)
        if params.structured is not None:  # compile in a worker thread, not on the step thread
            await asyncio.to_thread(self.core.structured.precompile, params.structured)
        stream = RequestStream(self, request_id or uuid.uuid4().hex, asyncio.get_running_loop())
        try:
            with self._cond:
                self._check_alive()
                # Refuse at once when the queue is surely full, rather than a step later.
                if self._stats["num_waiting"] + self._pending_adds >= self.config.max_waiting:
                    raise EngineOverloadedError("the waiting queue is full")
                self._pending_adds += 1
            await self.submit("add", _Add(stream, ids, params))
        except asyncio.CancelledError:
            self.abort(stream.request_id)  # the add may still be applied; the abort behind it undoes it
            raise
        except (EngineOverloadedError, InvalidRequestError, EngineDeadError) as exc:
            reason = {EngineOverloadedError: "overloaded", InvalidRequestError: "invalid"}.get(type(exc), "engine_dead")
            self.num_rejected[reason] += 1
            raise
        return stream

    async def generate(
        self, prompt: Prompt, params: SamplingParams, request_id: str | None = None
    ) -> AsyncIterator[RequestOutput]:
        """Yield the request's deltas.

        Steps: 1. tokenize a text prompt; 2. submit it and wait for acceptance (typed
        errors surface here, before any output); 3. yield each delta until the finished
        one; 4. if the consumer stops early, abort (the engine frees its blocks).
        """
        stream = await self.add_request(prompt, params, request_id)
        try:
            async for out in stream:
                yield out
        finally:
            stream.abort()

    def abort(self, request_id: str | list[str]) -> None:
        """Abort requests (fire and forget; thread-safe; unknown ids are ignored)."""
        ids = [request_id] if isinstance(request_id, str) else list(request_id)
        with self._cond:
            if self._dead is None and not self._stopping:
                self._inbox.append(_Command("abort", ids))
                self._cond.notify()

    async def submit(self, kind: str, payload: Any = None) -> Any:
        """Apply a command at the next step boundary; return the handler's result."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Any] = loop.create_future()
        with self._cond:
            if self._dead is not None or self._stopping:
                if kind == "add":
                    self._pending_adds -= 1
                self._check_alive()
            self._inbox.append(_Command(kind, payload, loop, fut))
            self._cond.notify()
        return await fut

    async def reset_prefix_cache(self) -> None:
        await self.submit("reset_prefix_cache")

    async def pause(self, mode: PauseMode = "keep") -> None:
        """Stop stepping at the next step boundary. Idempotent.

        keep: in-flight requests wait, untouched, and continue after resume().
        abort: in-flight requests finish with "abort" (their partial outputs delivered).
        wait: admit nothing new, let the in-flight requests finish; returns once they have.
        Requests added while paused queue up and run after resume(); none is lost.
        """
        if mode not in ("keep", "abort", "wait"):
            raise InvalidRequestError(f"pause mode must be keep, abort or wait, got {mode!r}", "mode")
        if mode != "wait":
            await self.submit("pause", _Pause(mode))
            return
        loop = asyncio.get_running_loop()
        cmd = _Pause(mode, loop, loop.create_future())
        await self.submit("pause", cmd)
        assert cmd.drained is not None
        await cmd.drained

    async def resume(self) -> None:
        """Start stepping again (idempotent); held and queued requests run."""
        await self.submit("resume")

    def is_paused(self) -> bool:
        return self._paused

    @property
    def weight_version(self) -> int:
        return self.core.weight_version

    async def update_weights(
        self, weights: WeightSource, mode: UpdateMode = "keep", load_format: str = "hf"
    ) -> int:
        """Swap in new weights at a step boundary; return the new weight_version.

        A path (safetensors file or directory) or safetensors bytes are read on a worker
        thread first, so the engine keeps serving while they load; only the swap holds
        the engine. Abort-mode outputs reach their streams. WeightLoadError (bad names,
        shapes, dtypes, values) leaves the old weights and version serving.
        """
        if load_format not in ("hf", "auto"):
            raise InvalidRequestError(f"load_format must be 'hf' (HF tensor names), got {load_format!r}", "load_format")
        state = weights if isinstance(weights, Mapping) else await asyncio.to_thread(read_weight_source, weights)
        return int(await self.submit("update_weights", (state, mode)))

    async def apply_weights(self, write: Callable[[], None], mode: UpdateMode = "keep") -> int:
        """Like update_weights, with the weights put in place by write() at the step
        boundary (EngineCore.apply_weights; e.g. a swap of weights staged aside)."""
        return int(await self.submit("apply_weights", (write, mode)))

    async def weight_checksums(self) -> dict[str, str]:
        """sha256 per HF tensor name of the weights being served (hashed on the engine thread)."""
        return await self.call(lambda core: core.weight_checksums())

    async def call(self, fn: Callable[[EngineCore], T]) -> T:
        """Run fn(core) on the engine thread at a step boundary; return its result."""
        return await self.submit("call", fn)

    def stats(self) -> dict[str, float]:
        """EngineCore.stats() after the latest step or command (a snapshot), with the
        requests held by a pause and those refused at admission."""
        s = dict(self._stats)
        # Paused: every in-flight request waits; draining (pause "wait"): the held adds.
        held = len(self._held)
        s["num_paused_requests"] = s["num_running"] + s["num_waiting"] + held if self._paused else held
        s.update((f"num_rejected_{k}", v) for k, v in self.num_rejected.items())
        return s

    @property
    def is_healthy(self) -> bool:
        return self._dead is None and self._thread.is_alive()

    @property
    def dead_error(self) -> BaseException | None:
        return self._dead

    def shutdown(self, timeout: float = 30.0) -> None:
        """Abort all requests (they finish with "abort"), stop the thread and join it."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    def _check_alive(self) -> None:
        if self._dead is not None:
            raise EngineDeadError(f"the engine is dead: {self._dead!r}") from self._dead
        if self._stopping:
            raise EngineDeadError("the engine is shut down")

    # -- engine thread ----------------------------------------------------------------
    def _run(self) -> None:
        try:
            while (commands := self._next_commands()) is not None:
                if commands:  # a step boundary: the last step's outputs reach their streams first
                    self._deliver(self.core.flush())
                for cmd in commands:
                    self._apply(cmd)
                # Queued requests expire while paused too.
                if self._paused and (expired := self.core.expire_waiting()):
                    self._stats = self.core.stats()
                    self._deliver(expired)
                if not self._paused and self.core.has_unfinished():
                    self._step()
                self._check_drained()
            self._deliver(self.core.abort(list(self._streams)))
            self.core.close()
            self._fail_pending(EngineDeadError("the engine is shut down"))
        except BaseException as exc:  # a fatal error must not hang any client
            with self._cond:
                self._dead = exc
            err = EngineDeadError(f"the engine failed: {exc!r}")
            err.__cause__ = exc
            streams, self._streams = self._streams, {}
            _post_all([(s, err) for s in streams.values()])
            self._fail_pending(err)

    def _next_commands(self) -> list[_Command] | None:
        """Sleep until there is a command or a step to run; None means stop."""
        with self._cond:
            while not (self._inbox or self._stopping or (not self._paused and self.core.has_unfinished())):
                if not self._cond.wait(self._wait_timeout()):
                    break  # timed out: check the queue for expired requests
            if self._stopping:
                return None
            commands, self._inbox = self._inbox, []
            return commands

    def _wait_timeout(self) -> float | None:
        """How long the idle engine thread may sleep: forever, unless queued requests
        can expire (max_queue_seconds) while it is paused."""
        limit = self.config.max_queue_seconds
        if limit is None or not self.core.scheduler.waiting:
            return None
        return min(0.05, limit / 4)

    def _step(self) -> None:
        t0 = time.perf_counter()
        if self.config.async_scheduling:
            # The previous step's outputs, built while this step's forward runs, go out
            # before it ends; the stats already counted that step (taken after its commit).
            outs = self.core.begin_step()
            self._deliver(outs)
            self.core.end_step()
            self._stats = self.core.stats()
            self._observe(time.perf_counter() - t0, outs)
            return
        outs = self.core.step()
        elapsed = time.perf_counter() - t0
        # Stats and the observer first: a caller woken by its final output must see them
        # up to date (a /metrics scrape right after a response counts its last step).
        self._stats = self.core.stats()
        self._observe(elapsed, outs)
        self._deliver(outs)

    def _observe(self, elapsed: float, outs: list[RequestOutput]) -> None:
        self.num_steps += 1
        if self.step_observer is not None:
            try:
                self.step_observer(elapsed, sum(len(o.token_ids) for o in outs), len(outs))
            except Exception:  # metrics must never take the engine down
                log.exception("step observer failed")

    def _apply(self, cmd: _Command) -> None:
        try:
            handler = self.handlers.get(cmd.kind)
            if handler is None:
                raise ValueError(f"unknown engine command {cmd.kind!r}")
            result, exc = handler(cmd.payload), None
        except Exception as e:  # the caller gets the error; the engine goes on
            result, exc = None, e
        self._stats = self.core.stats()
        _resolve(cmd, result, exc)

    def _add(self, add: _Add) -> None:
        if self._draining:  # pause(wait): admit nothing new until the in-flight ones finish
            self._held.append(add)
        else:
            self._admit(add)

    def _admit(self, add: _Add) -> None:
        rid = add.stream.request_id
        try:
            if rid in self._streams:
                raise InvalidRequestError(f"request id {rid!r} is already in use", "request_id")
            self.core.add_request(rid, add.prompt_token_ids, add.params)
        finally:
            with self._cond:
                self._pending_adds -= 1
        self._streams[rid] = add.stream

    def _abort(self, ids: list[str]) -> None:
        held = [a for a in self._held if a.stream.request_id in ids]
        if held:  # admit them, so the abort below gives their streams a final output
            self._held = [a for a in self._held if a not in held]
            self._admit_all(held)
        self._deliver(self.core.abort(ids))

    def _pause(self, cmd: _Pause) -> None:
        if cmd.mode == "abort":
            self._deliver(self.core.abort(list(self.core.requests)))
        if cmd.mode == "wait" and not self._paused:
            self._draining = True
            self._drain_waiters.append(cmd)
            self._check_drained()
            return
        self._paused = True
        self._finish_drain(cmd)

    def _resume(self) -> None:
        self._paused = False
        self._finish_drain()

    def _check_drained(self) -> None:
        if self._draining and not self.core.has_unfinished():
            self._paused = True
            self._finish_drain()

    def _finish_drain(self, *extra: _Pause) -> None:
        """End a pause(wait): settle its waiters and queue the held adds in the core."""
        self._draining = False
        waiters, self._drain_waiters = [*self._drain_waiters, *extra], []
        held, self._held = self._held, []
        self._admit_all(held)
        for w in waiters:
            if w.drained is not None and w.loop is not None:
                _resolve(_Command("pause", None, w.loop, w.drained), None, None)

    def _admit_all(self, adds: list[_Add]) -> None:
        for add in adds:
            try:
                self._admit(add)
            except Exception as exc:  # its caller already returned: the error ends its stream
                _post_all([(add.stream, exc)])

    def _update_weights(self, payload: tuple[Mapping[str, Any], UpdateMode]) -> int:
        state, mode = payload
        self._deliver(self.core.update_weights(state, mode))
        return self.core.weight_version

    def _apply_weights(self, payload: tuple[Callable[[], None], UpdateMode]) -> int:
        write, mode = payload
        t0 = time.perf_counter()
        self._deliver(self.core.apply_weights(write, mode))
        self.last_apply_s = time.perf_counter() - t0  # how long the engine did not step for it
        return self.core.weight_version

    def _deliver(self, outs: list[RequestOutput]) -> None:
        """Hand outputs to their streams (a finished request's stream is forgotten)."""
        items: list[tuple[RequestStream, StreamItem]] = []
        for out in outs:
            stream = self._streams.pop(out.request_id, None) if out.finished else self._streams.get(out.request_id)
            if stream is None:
                continue
            if out.error is not None:  # a failed request's stream raises its error
                items.append((stream, request_error(out.error_code or "request_failed", out.error)))
            else:
                items.append((stream, out))
        orphans = _post_all(items)
        if orphans:  # their event loop is closed: nobody listens, free the blocks
            self.core.abort([s.request_id for s in orphans])

    def _fail_pending(self, err: BaseException) -> None:
        with self._cond:
            commands, self._inbox = self._inbox, []
            self._pending_adds = 0
        for cmd in commands:
            _resolve(cmd, None, err)
        # Requests held by a pause(wait) and its waiters must not hang either.
        held, self._held = self._held, []
        _post_all([(a.stream, err) for a in held])
        waiters, self._drain_waiters = self._drain_waiters, []
        for w in waiters:
            if w.drained is not None and w.loop is not None:
                _resolve(_Command("pause", None, w.loop, w.drained), None, err)
