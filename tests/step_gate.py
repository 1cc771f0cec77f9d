"""Land an AsyncEngine command at a chosen step boundary, without timing.

The gate is the engine's step observer (called on the step thread after each step). At
the first step after which `ready(core)` holds it blocks the step thread; a command
submitted meanwhile waits in the inbox, and AsyncEngine applies its inbox before the
next step. So "16 requests still running when the update lands" holds by construction,
on a fast or a loaded machine alike. Waits are bounded so a bug fails instead of hangs.
"""
from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Coroutine
from typing import Any

from asyncengine.async_engine import AsyncEngine
from asyncengine.engine_core import EngineCore

TIMEOUT_S = 60.0


class StepGate:
    def __init__(self, engine: AsyncEngine, ready: Callable[[EngineCore], bool]) -> None:
        self.engine = engine
        self.ready = ready
        self.reached = threading.Event()
        self.released = threading.Event()
        # Per step: the weight versions of the tokens it produced (engine thread only).
        self.step_versions: list[set[int]] = []
        step = engine.core.step

        def recording_step() -> list[Any]:
            outs = step()
            self.step_versions.append({v for o in outs for v in o.weight_versions})
            return outs

        engine.core.step = recording_step  # type: ignore[method-assign]
        engine.step_observer = self._observe

    def _observe(self, seconds: float, tokens: int, outputs: int) -> None:
        if not self.reached.is_set() and self.ready(self.engine.core):
            self.reached.set()
            self.released.wait(TIMEOUT_S)

    async def wait(self) -> None:
        """Until the step thread is held at the chosen boundary."""
        assert await asyncio.to_thread(self.reached.wait, TIMEOUT_S), "the gate's condition never held"

    async def land(self, command: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        """Submit `command` while the step thread is held, then let the engine go on: the
        command applies at this boundary. Returns its task (await it for the result)."""
        await self.wait()
        inbox = self.engine._inbox  # the list the step thread takes at the next boundary
        queued = len(inbox)
        task = asyncio.create_task(command)
        for _ in range(int(TIMEOUT_S * 1000)):  # a path is read on a worker thread first
            if len(inbox) > queued or task.done():
                break
            await asyncio.sleep(0.001)
        self.released.set()
        return task


def all_running(n: int) -> Callable[[EngineCore], bool]:
    """n requests admitted, each with at least one token out, none finished."""
    def ready(core: EngineCore) -> bool:
        reqs = list(core.requests.values())
        return len(reqs) == n and all(r.num_output_tokens > 0 and not r.is_finished for r in reqs)

    return ready
