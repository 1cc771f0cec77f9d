"""Graceful shutdown (--shutdown-timeout S): on SIGTERM, drain for at most S seconds.

aiohttp stops listening first (new connections are refused), then runs the app's
on_shutdown hooks, then waits for the open handlers. Our hook: 1. refuse new
inference requests on kept-alive connections (503); 2. wait until the engine has no
request left, at most S seconds; 3. abort what remains, so every open stream gets its
final chunk with finish_reason "abort" (and a full response its partial output) rather
than a cut connection; 4. give the handlers a moment to write it.
"""
from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING

from aiohttp import web
from aiohttp.typedefs import Handler

from api.auth import PROTECTED_PREFIXES
from api.protocol import APIError
from asyncengine.async_engine import EngineDeadError

if TYPE_CHECKING:
    from asyncengine.async_engine import AsyncEngine

log = logging.getLogger(__name__)
DRAINING_KEY: web.AppKey[list[bool]] = web.AppKey("draining", list)
_POLL_S = 0.05


def _in_flight(engine: AsyncEngine) -> int:
    s = engine.stats()
    return int(s["num_running"] + s["num_waiting"] + s["num_paused_requests"])


def add_graceful_shutdown(app: web.Application, engine: AsyncEngine, timeout_s: float) -> None:
    """Install the drain on `app` (see the module docstring)."""
    draining = app[DRAINING_KEY] = [False]

    @web.middleware
    async def refuse_while_draining(request: web.Request, handler: Handler) -> web.StreamResponse:
        if draining[0] and request.path.startswith(PROTECTED_PREFIXES):
            raise APIError(503, "The server is shutting down", "server_error", code="shutting_down")
        return await handler(request)

    async def drain(_: web.Application) -> None:
        draining[0] = True
        deadline = time.monotonic() + timeout_s
        log.info("shutting down: draining %d requests for at most %.1f s", _in_flight(engine), timeout_s)
        while _in_flight(engine) and time.monotonic() < deadline and engine.is_healthy:
            await asyncio.sleep(_POLL_S)
        left = _in_flight(engine)
        if left and engine.is_healthy:
            log.warning("shutdown timeout: aborting %d requests", left)
            try:
                await engine.pause("abort")  # their streams get finish_reason "abort"
            except EngineDeadError:  # died meanwhile: its streams already got the error
                pass
        # The handlers now write their last chunks; aiohttp then waits for them to return.
        await asyncio.sleep(_POLL_S)

    app.middlewares.append(refuse_while_draining)
    app.on_shutdown.append(drain)
