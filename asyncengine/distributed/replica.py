"""One engine replica: an AsyncEngine and the single-process HTTP server, in one process.

`EngineReplica` is a plain class whose methods are coroutines, so Ray runs it as an
async actor (`ray.remote(EngineReplica)`; frameworks may place it themselves with their
own options) and the same object serves a test without Ray. Its HTTP server is the one
`asyncengine serve` runs (every endpoint, streaming included); the front proxies to it.
Control calls (pause, resume, weights) come as actor method calls, so weights arrive as
one object-store reference instead of an HTTP body per replica.
"""
from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

if TYPE_CHECKING:
    from aiohttp import web

    from asyncengine.async_engine import AsyncEngine
    from asyncengine.config import EngineConfig

# (array, torch dtype name): numpy has no bfloat16, so 16-bit tensors travel as their bits.
PackedTensor = tuple[np.ndarray, str]
_BITS = {torch.bfloat16: torch.int16, torch.float16: torch.int16}


def pack_state(state: Mapping[str, torch.Tensor]) -> dict[str, PackedTensor]:
    """HF-named tensors as numpy arrays, which Ray's object store shares without copies."""
    packed: dict[str, PackedTensor] = {}
    for name, t in state.items():
        t = t.detach().to("cpu").contiguous()
        bits = t.view(_BITS[t.dtype]) if t.dtype in _BITS else t
        packed[name] = (bits.numpy(), str(t.dtype).removeprefix("torch."))
    return packed


def unpack_state(packed: Mapping[str, PackedTensor]) -> dict[str, torch.Tensor]:
    """The inverse of pack_state; the tensors view the (read-only) shared arrays."""
    out: dict[str, torch.Tensor] = {}
    with warnings.catch_warnings():  # read-only views: the engine copies, never writes them
        warnings.simplefilter("ignore", UserWarning)
        for name, (arr, dtype) in packed.items():
            t = torch.from_numpy(arr)
            out[name] = t.view(getattr(torch, dtype)) if t.dtype != getattr(torch, dtype) else t
    return out


class EngineReplica:
    """An AsyncEngine serving HTTP on `host` (a free port), plus control methods."""

    def __init__(self, config: EngineConfig, served_model_names: list[str] | None = None,
                 app_options: dict[str, Any] | None = None, host: str = "127.0.0.1",
                 admin_key: str | None = None) -> None:
        self.config = config
        # The group's own key for this replica's admin endpoints (the weight-transfer
        # protocol reaches each replica over HTTP; the front holds the key).
        self.admin_key = admin_key
        self.names = served_model_names
        self.app_options = dict(app_options or {})
        self.host = host
        self.engine: AsyncEngine | None = None
        self._runner: web.AppRunner | None = None

    async def start(self) -> str:
        """Load the model, start the HTTP server; return its base URL."""
        from aiohttp import web

        from api.server import create_app
        from asyncengine.async_engine import AsyncEngine

        self.engine = AsyncEngine.from_config(self.config)
        options = dict(self.app_options)
        limits = options.pop("limits", None)  # api/limits.py's request limits, as on one server
        app = create_app(self.engine, self.names, **options)
        if limits is not None:
            from api.limits import LIMITS_KEY

            app[LIMITS_KEY] = limits
        if self.admin_key:
            from api.admin import add_admin_routes

            add_admin_routes(app, self.engine, self.admin_key, None)
        self._runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return f"http://{self.host}:{port}"

    def _engine(self) -> AsyncEngine:
        if self.engine is None:
            raise RuntimeError("the replica is not started")
        return self.engine

    async def health(self) -> bool:
        return self._engine().is_healthy

    async def stats(self) -> dict[str, float]:
        return self._engine().stats()

    async def pause(self, mode: str = "keep") -> bool:
        await self._engine().pause(mode)  # type: ignore[arg-type]
        return self._engine().is_paused()

    async def resume(self) -> bool:
        await self._engine().resume()
        return self._engine().is_paused()

    async def reset_prefix_cache(self) -> None:
        await self._engine().reset_prefix_cache()

    async def call(self, fn: Any) -> Any:
        """fn(core) at a step boundary of this replica's engine (admin calls fanned out)."""
        return await self._engine().call(fn)

    async def weight_version(self) -> int:
        return self._engine().weight_version

    async def weight_checksums(self) -> dict[str, str]:
        return await self._engine().weight_checksums()

    async def update_weights(self, packed: Mapping[str, PackedTensor], mode: str = "keep") -> int:
        """Swap in weights (Ray resolves the reference to the shared arrays first)."""
        return await self._engine().update_weights(unpack_state(packed), mode)  # type: ignore[arg-type]

    async def export_weights(self) -> dict[str, PackedTensor]:
        """A copy of the weights being served, HF-named (for a replacement to join with)."""
        from asyncengine.models.weights import export_state

        def copy(core: Any) -> dict[str, PackedTensor]:
            return pack_state({k: v.clone() for k, v in export_state(core.model).items()})

        return await self._engine().call(copy)

    async def sync_weights(self, packed: Mapping[str, PackedTensor] | None, version: int) -> int:
        """Join a group: take its weights (None: the initial ones) and its version number,
        before any request is routed here."""
        state = unpack_state(packed) if packed is not None else None

        def apply(core: Any) -> int:
            if state is not None:
                core.update_weights(state, "keep")
            core.weight_version = core.scheduler.weight_version = version
            core.reset_prefix_cache()
            return core.weight_version

        return await self._engine().call(apply)

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
        if self.engine is not None:
            self.engine.shutdown()
