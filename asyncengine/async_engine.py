"""AsyncEngine: an actor that feeds the synchronous EngineCore from asyncio.

One inbox of commands (add, abort, reset_prefix_cache, pause, resume, call), one step
loop on a dedicated thread (the only thread that touches EngineCore, so the event
loop stays responsive while a step runs), and per-request output streams that the
engine thread fills through `loop.call_soon_threadsafe`.

Commands are applied at step boundaries, in arrival order. Extra commands (issue #4:
update_weights, pause modes) plug in as handlers of `_apply` or through `call()`,
which runs any function on the engine thread between two steps.
"""
from __future__ import annotations

import asyncio
import copy
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from asyncengine.config import EngineConfig, ModelInfo
from asyncengine.engine_core import EngineCore, EngineOverloadedError
from asyncengine.outputs import RequestOutput
from asyncengine.sampling_params import InvalidRequestError, SamplingParams

log = logging.getLogger(__name__)
T = TypeVar("T")
Prompt = str | list[int]
# Called on the engine thread after each step: (seconds, new tokens, requests in the batch).
StepObserver = Callable[[float, int, int], None]


class EngineDeadError(RuntimeError):
    """The engine thread stopped (a fatal error in step(), or shutdown)."""


@dataclass(slots=True)
class _Command:
    # "add" | "abort" | "reset_prefix_cache" | "pause" | "resume" | "call"
    kind: str
    # Kind-specific argument (a _Add, a list of request ids, a callable, ...).
    payload: Any = None
    # Where the result goes (None: fire and forget).
    loop: asyncio.AbstractEventLoop | None = None
    future: asyncio.Future[Any] | None = None


@dataclass(slots=True)
class _Add:
    stream: RequestStream
    prompt_token_ids: list[int]
    params: SamplingParams


class RequestStream:
    """The outputs of one request, in order; iterate it once.

    Leaving the iteration early (break, cancellation, aclose) aborts the request.
    """

    def __init__(self, engine: AsyncEngine, request_id: str, loop: asyncio.AbstractEventLoop) -> None:
        self.engine = engine
        self.request_id = request_id
        self.loop = loop
        self._queue: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()
        self.finished = False

    def _put(self, item: RequestOutput | BaseException) -> None:
        """Loop thread: one output (or the error that ends the stream)."""
        self._queue.put_nowait(item)

    def __aiter__(self) -> AsyncIterator[RequestOutput]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[RequestOutput]:
        """Steps: 1. wait for the next delta; 2. raise it if it is an error; 3. yield it;
        4. stop after the finished delta; 5. if the consumer left early, abort."""
        try:
            while not self.finished:
                item = await self._queue.get()
                if isinstance(item, BaseException):
                    self.finished = True
                    raise item
                self.finished = item.finished
                yield item
        finally:
            self.abort()

    def abort(self) -> None:
        """Abort the request if it has not finished (idempotent, never blocks)."""
        if not self.finished:
            self.finished = True
            self.engine.abort(self.request_id)


class AsyncEngine:
    """Serve EngineCore to asyncio callers; see the module docstring."""

    def __init__(self, core: EngineCore, step_observer: StepObserver | None = None) -> None:
        self.core = core
        self.config: EngineConfig = core.config
        self.model_info: ModelInfo = core.model_info
        # The engine thread detokenizes with core.tokenizer; HF fast tokenizers are not
        # safe to share across threads, so the loop side gets its own copy.
        self.tokenizer = copy.deepcopy(core.tokenizer) if core.tokenizer is not None else None
        self.step_observer = step_observer
        self._cond = threading.Condition(threading.RLock())
        self._inbox: list[_Command] = []
        self._pending_adds = 0
        self._stopping = False
        self._paused = False
        self._dead: BaseException | None = None
        # Engine thread only: request id -> its stream.
        self._streams: dict[str, RequestStream] = {}
        self._stats: dict[str, float] = dict(core.stats())
        self.num_steps = 0
        self.kv_capacity_tokens = int(self._stats["num_total_blocks"]) * core.config.block_size
        self._thread = threading.Thread(target=self._run, name="asyncengine-step", daemon=True)
        self._thread.start()

    @classmethod
    def from_config(cls, config: EngineConfig, tokenizer: Any | None = None) -> AsyncEngine:
        return cls(EngineCore(config, tokenizer))

    # -- public API (event loop thread) -----------------------------------------------
    def encode(self, prompt: Prompt) -> list[int]:
        """Token ids of a text prompt (with special tokens, like LLM.encode) or of ids."""
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise InvalidRequestError("text prompts need a tokenizer; pass token ids", "prompt")
            return list(self.tokenizer.encode(prompt, add_special_tokens=True))
        return list(prompt)

    async def add_request(
        self, prompt: Prompt, params: SamplingParams, request_id: str | None = None
    ) -> RequestStream:
        """Queue a request and wait until the engine accepted it.

        Raises InvalidRequestError / EngineOverloadedError / EngineDeadError before any output.
        """
        ids = self.encode(prompt)
        loop = asyncio.get_running_loop()
        stream = RequestStream(self, request_id or uuid.uuid4().hex, loop)
        with self._cond:
            self._check_alive()
            # Reject at once when the queue is surely full, rather than after a step.
            if self._stats["num_waiting"] + self._pending_adds >= self.config.max_waiting:
                raise EngineOverloadedError("the waiting queue is full")
            self._pending_adds += 1
        try:
            await self._submit("add", _Add(stream, ids, params), wait=True)
        except asyncio.CancelledError:
            # The add may still be applied: the abort queued behind it undoes it.
            self.abort(stream.request_id)
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

    async def reset_prefix_cache(self) -> None:
        await self._submit("reset_prefix_cache", None, wait=True)

    async def pause(self) -> None:
        """Stop stepping at the next step boundary; queued and running requests wait."""
        await self._submit("pause", None, wait=True)

    async def resume(self) -> None:
        await self._submit("resume", None, wait=True)

    def is_paused(self) -> bool:
        return self._paused

    async def call(self, fn: Callable[[EngineCore], T]) -> T:
        """Run fn(core) on the engine thread at a step boundary; return its result."""
        return await self._submit("call", fn, wait=True)

    def stats(self) -> dict[str, float]:
        """The engine's stats after the latest step or command (a snapshot)."""
        return dict(self._stats)

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

    # -- plumbing ---------------------------------------------------------------------
    def _check_alive(self) -> None:
        if self._dead is not None:
            raise EngineDeadError(f"the engine is dead: {self._dead!r}") from self._dead
        if self._stopping:
            raise EngineDeadError("the engine is shut down")

    async def _submit(self, kind: str, payload: Any, wait: bool) -> Any:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Any] = loop.create_future()
        with self._cond:
            try:
                self._check_alive()
            except EngineDeadError:
                if kind == "add":
                    self._pending_adds -= 1
                raise
            self._inbox.append(_Command(kind, payload, loop, fut))
            self._cond.notify()
        return await fut if wait else None

    # -- engine thread ----------------------------------------------------------------
    def _run(self) -> None:
        try:
            while True:
                commands = self._next_commands()
                if commands is None:
                    break
                for cmd in commands:
                    self._apply(cmd)
                if not self._paused and self.core.has_unfinished():
                    self._step()
            self._abort_all()
            self._fail_pending(EngineDeadError("the engine is shut down"))
        except BaseException as exc:  # a fatal error must not hang any client
            self._dead = exc
            self._fail_all(exc)

    def _next_commands(self) -> list[_Command] | None:
        """Sleep until there is a command or a step to run; None means stop."""
        with self._cond:
            while not (self._inbox or self._stopping or (not self._paused and self.core.has_unfinished())):
                self._cond.wait()
            if self._stopping:
                return None
            commands, self._inbox = self._inbox, []
            return commands

    def _step(self) -> None:
        t0 = time.perf_counter()
        outs = self.core.step()
        elapsed = time.perf_counter() - t0
        self.num_steps += 1
        # Stats first: a caller woken by its final output must see them up to date.
        self._stats = self.core.stats()
        self._deliver(outs)
        if self.step_observer is not None:
            try:
                self.step_observer(elapsed, sum(len(o.token_ids) for o in outs), len(outs))
            except Exception:  # metrics must never take the engine down
                log.exception("step observer failed")

    def _apply(self, cmd: _Command) -> None:
        result: Any = None
        try:
            if cmd.kind == "add":
                self._add(cmd.payload)
            elif cmd.kind == "abort":
                self._deliver(self.core.abort(cmd.payload))
            elif cmd.kind == "reset_prefix_cache":
                self.core.reset_prefix_cache()
            elif cmd.kind in ("pause", "resume"):
                self._paused = cmd.kind == "pause"
            elif cmd.kind == "call":
                result = cmd.payload(self.core)
            else:
                raise ValueError(f"unknown engine command {cmd.kind!r}")
        except Exception as exc:  # the caller gets the error; the engine goes on
            _resolve(cmd, None, exc)
            return
        finally:
            self._stats = self.core.stats()
        _resolve(cmd, result, None)

    def _add(self, add: _Add) -> None:
        rid = add.stream.request_id
        try:
            if rid in self._streams:
                raise InvalidRequestError(f"request id {rid!r} is already in use", "request_id")
            self.core.add_request(rid, add.prompt_token_ids, add.params)
        finally:
            with self._cond:
                self._pending_adds -= 1
        self._streams[rid] = add.stream

    def _deliver(self, outs: list[RequestOutput]) -> None:
        """Hand outputs to their streams: one call_soon_threadsafe per event loop."""
        batches: dict[asyncio.AbstractEventLoop, list[tuple[RequestStream, RequestOutput | BaseException]]] = {}
        for out in outs:
            stream = self._streams.get(out.request_id)
            if stream is None:
                continue
            if out.finished:
                del self._streams[out.request_id]
            batches.setdefault(stream.loop, []).append((stream, out))
        for loop, items in batches.items():
            if not _post(loop, items):
                # Nobody can listen any more (their loop closed): free the blocks.
                self.core.abort([s.request_id for s, o in items if not getattr(o, "finished", True)])

    def _abort_all(self) -> None:
        self._deliver(self.core.abort(list(self._streams)))

    def _fail_all(self, exc: BaseException) -> None:
        err = EngineDeadError(f"the engine failed: {exc!r}")
        err.__cause__ = exc
        streams, self._streams = self._streams, {}
        batches: dict[asyncio.AbstractEventLoop, list[tuple[RequestStream, RequestOutput | BaseException]]] = {}
        for s in streams.values():
            batches.setdefault(s.loop, []).append((s, err))
        for loop, items in batches.items():
            _post(loop, items)
        self._fail_pending(err)

    def _fail_pending(self, err: BaseException) -> None:
        with self._cond:
            commands, self._inbox = self._inbox, []
            self._pending_adds = 0
        for cmd in commands:
            _resolve(cmd, None, err)


def _post(loop: asyncio.AbstractEventLoop, items: list[tuple[RequestStream, RequestOutput | BaseException]]) -> bool:
    try:
        loop.call_soon_threadsafe(_dispatch, items)
        return True
    except RuntimeError:  # the loop is closed
        return False


def _dispatch(items: list[tuple[RequestStream, RequestOutput | BaseException]]) -> None:
    for stream, item in items:
        stream._put(item)


def _resolve(cmd: _Command, result: Any, exc: BaseException | None) -> None:
    if cmd.future is None or cmd.loop is None:
        return
    fut = cmd.future

    def settle() -> None:
        if fut.done():  # the caller was cancelled meanwhile
            return
        if exc is not None:
            fut.set_exception(exc)
        else:
            fut.set_result(result)

    try:
        cmd.loop.call_soon_threadsafe(settle)
    except RuntimeError:
        pass
