"""The asyncio side of AsyncEngine's thread boundary: per-request output streams and
the commands the event loop sends to the engine thread, with the helpers that carry
results back (`loop.call_soon_threadsafe`, one call per loop and step)."""
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from asyncengine.outputs import RequestOutput
from asyncengine.sampling_params import SamplingParams

if TYPE_CHECKING:
    from asyncengine.async_engine import AsyncEngine

# What the engine thread hands to a stream: a delta, or the error that ends it.
StreamItem = RequestOutput | BaseException
PauseMode = Literal["keep", "abort", "wait"]


@dataclass(slots=True)
class _Command:
    # The handler's name in AsyncEngine.handlers.
    kind: str
    # The handler's argument.
    payload: Any = None
    # Where the handler's result or exception goes (None: fire and forget).
    loop: asyncio.AbstractEventLoop | None = None
    future: asyncio.Future[Any] | None = None


@dataclass(slots=True)
class _Pause:
    mode: PauseMode
    # mode "wait": settled once the in-flight requests have finished.
    loop: asyncio.AbstractEventLoop | None = None
    drained: asyncio.Future[None] | None = None


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
        self.queue: asyncio.Queue[StreamItem] = asyncio.Queue()
        self.finished = False

    def __aiter__(self) -> AsyncIterator[RequestOutput]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[RequestOutput]:
        """Steps: 1. wait for the next item; 2. raise it if it is an error; 3. yield the
        delta; 4. stop after the finished one; 5. if the consumer left early, abort."""
        try:
            while not self.finished:
                item = await self.queue.get()
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


def _post_all(items: list[tuple[RequestStream, StreamItem]]) -> list[RequestStream]:
    """One call_soon_threadsafe per event loop; returns the streams whose loop is closed."""
    by_loop: dict[asyncio.AbstractEventLoop, list[tuple[RequestStream, StreamItem]]] = {}
    for stream, item in items:
        by_loop.setdefault(stream.loop, []).append((stream, item))
    orphans = []
    for loop, batch in by_loop.items():
        try:
            loop.call_soon_threadsafe(_dispatch, batch)
        except RuntimeError:  # the loop is closed
            orphans += [s for s, _ in batch]
    return orphans


def _dispatch(batch: list[tuple[RequestStream, StreamItem]]) -> None:
    for stream, item in batch:
        stream.queue.put_nowait(item)


def _resolve(cmd: _Command, result: Any, exc: BaseException | None) -> None:
    """Settle the command's future on its loop (unless the caller gave up meanwhile)."""
    fut, loop = cmd.future, cmd.loop
    if fut is None or loop is None:
        return

    def settle() -> None:
        if not fut.done():
            fut.set_exception(exc) if exc is not None else fut.set_result(result)

    try:
        loop.call_soon_threadsafe(settle)
    except RuntimeError:  # the loop is closed
        pass
