"""RL admin endpoints, named as vLLM names them: pause/resume, weight updates, versions.

Off unless the server has an admin key (every admin path is then a 404, as if absent);
with a key, each call needs `Authorization: Bearer KEY`. Weight paths must resolve
(symlinks included) inside the allowed directory, so a key holder cannot make the server
read arbitrary files.
"""
from __future__ import annotations

import hmac
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson
from aiohttp import web

from api.protocol import APIError
from api.weight_transfer import DEFAULT_TIMEOUT_S, WeightTransfer

if TYPE_CHECKING:
    from asyncengine.async_engine import AsyncEngine

# A raw safetensors body may be a whole checkpoint (SmolLM2-135M: 538 MB in fp32).
DEFAULT_MAX_WEIGHTS_BYTES = 8 * 2**30
_CHUNK = 4 * 2**20
PAUSE_MODES = ("keep", "abort", "wait")
UPDATE_MODES = ("keep", "recompute", "abort")


def add_admin_routes(
    app: web.Application, engine: AsyncEngine, admin_key: str | None, allowed_weights_dir: Path | None,
    max_weights_bytes: int = DEFAULT_MAX_WEIGHTS_BYTES, transfer_timeout_s: float = DEFAULT_TIMEOUT_S,
    transfer: Any | None = None,
) -> None:
    """Register the admin endpoints on `app` when an admin key is configured. `transfer`
    serves the weight-transfer protocol (default: WeightTransfer on this engine; the replica
    front passes its fan-out, asyncengine/distributed/transfer.py)."""
    if not admin_key:
        return  # disabled: the router answers 404 for all of them
    admin = _Admin(engine, admin_key, allowed_weights_dir, max_weights_bytes)
    admin.transfer = transfer if transfer is not None else WeightTransfer(engine, transfer_timeout_s)
    app.on_cleanup.append(admin.transfer.cleanup)  # leave the gloo group when the app stops
    routes = [
        ("POST", "/pause", admin.pause), ("POST", "/resume", admin.resume),
        ("GET", "/is_paused", admin.is_paused), ("POST", "/reset_prefix_cache", admin.reset_prefix_cache),
        ("POST", "/update_weights", admin.update_weights), ("GET", "/weight_version", admin.weight_version),
        ("GET", "/weight_checksums", admin.weight_checksums),
    ]
    # vLLM's weight-transfer protocol (api/weight_transfer.py); /update_weights {"update_info"} is its.
    routes += admin.transfer.routes()
    for method, path, handler in routes:
        app.router.add_route(method, path, admin.guarded(handler))


def _json(obj: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(obj), status=status, content_type="application/json")


def _mode(value: Any, allowed: tuple[str, ...]) -> str:
    mode = "keep" if value is None else value
    if mode not in allowed:
        raise APIError(400, f"mode must be one of {', '.join(allowed)}; got {mode!r}", param="mode")
    return str(mode)


def _flag(value: Any, name: str) -> bool:
    """A boolean from JSON or a query string ("true"/"false"/"1"/"0"); absent is False."""
    if value is None or isinstance(value, bool):
        return bool(value)
    if isinstance(value, str) and value.lower() in ("true", "false", "1", "0"):
        return value.lower() in ("true", "1")
    raise APIError(400, f"{name} must be true or false, got {value!r}", param=name)


class _Admin:
    transfer: WeightTransfer

    def __init__(self, engine: AsyncEngine, key: str, allowed_dir: Path | None, max_weights_bytes: int) -> None:
        self.engine = engine
        self.key = key.encode()
        # resolve() once: the check compares resolved paths on both sides.
        self.allowed_dir = Path(allowed_dir).resolve() if allowed_dir is not None else None
        self.max_weights_bytes = max_weights_bytes

    def guarded(self, handler: Any) -> Any:
        async def wrapper(request: web.Request) -> web.StreamResponse:
            self._authorize(request)
            return await handler(request)

        return wrapper

    def _authorize(self, request: web.Request) -> None:
        auth = request.headers.get("Authorization", "")
        if not auth:
            raise APIError(401, "admin endpoints need 'Authorization: Bearer <admin key>'",
                           "authentication_error", code="missing_api_key")
        scheme, _, token = auth.partition(" ")
        # compare_digest: the key must not leak through response timing.
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.key):
            raise APIError(403, "invalid admin key", "permission_error", code="invalid_api_key")

    async def pause(self, request: web.Request) -> web.Response:
        """?mode=keep|abort|wait&clear_cache=true|false (SkyRL's and vLLM's query)."""
        mode = _mode(request.query.get("mode"), PAUSE_MODES)
        clear = _flag(request.query.get("clear_cache"), "clear_cache")
        await self.engine.pause(mode)  # type: ignore[arg-type]
        if clear:  # drop the prefix cache once stepping has stopped (running requests keep their KV)
            await self.engine.reset_prefix_cache()
        return _json({"is_paused": self.engine.is_paused(), "mode": mode, "clear_cache": clear})

    async def resume(self, request: web.Request) -> web.Response:
        await self.engine.resume()
        return _json({"is_paused": self.engine.is_paused()})

    async def is_paused(self, request: web.Request) -> web.Response:
        return _json({"is_paused": self.engine.is_paused()})

    async def reset_prefix_cache(self, request: web.Request) -> web.Response:
        """No body, or {"reset_running_requests": bool}: true also preempts the running
        requests, which recompute their KV (so no KV of any age survives)."""
        raw = await request.read()
        body = await self._json_body(request, ("reset_running_requests",)) if raw.strip() else {}
        running = _flag(body.get("reset_running_requests"), "reset_running_requests")

        def reset(core: Any) -> None:
            if running:
                core.scheduler.preempt_all()
            core.reset_prefix_cache()

        await self.engine.call(reset)
        return _json({"status": "ok", "success": True, "reset_running_requests": running})

    async def weight_version(self, request: web.Request) -> web.Response:
        return _json({"weight_version": self.engine.weight_version})

    async def weight_checksums(self, request: web.Request) -> web.Response:
        return _json({"weight_version": self.engine.weight_version,
                      "checksums": await self.engine.weight_checksums()})

    async def update_weights(self, request: web.Request) -> web.Response:
        """JSON {"path", "mode", "load_format"} or a safetensors body (octet-stream, ?mode=)."""
        if request.content_type == "application/octet-stream":
            source: Any = await self._read_body(request)
            mode, load_format = request.query.get("mode"), request.query.get("load_format", "hf")
        else:
            body = await self._json_body(request, ("path", "mode", "load_format", "update_info"))
            if "update_info" in body:  # the weight-transfer protocol's update: tensors over the group
                return await self.transfer.update(body)
            source = self._weights_path(body.get("path"))
            mode, load_format = body.get("mode"), body.get("load_format", "hf")
        mode = _mode(mode, UPDATE_MODES)
        version = await self._update(source, mode, str(load_format))
        return _json({"weight_version": version})

    async def _update(self, source: Any, mode: str, load_format: str) -> int:
        from asyncengine.models.weights import WeightLoadError
        from asyncengine.sampling_params import InvalidRequestError

        try:
            return await self.engine.update_weights(source, mode, load_format)  # type: ignore[arg-type]
        except (WeightLoadError, InvalidRequestError) as exc:
            raise APIError(400, f"weight update refused, old weights still serving: {exc}",
                           code="invalid_weights") from exc
        except FileNotFoundError as exc:
            raise APIError(404, str(exc), "not_found_error", "path", code="not_found") from exc

    async def _json_body(self, request: web.Request, known: tuple[str, ...]) -> dict[str, Any]:
        try:
            body = orjson.loads(await request.read())
        except orjson.JSONDecodeError as exc:
            raise APIError(400, f"invalid JSON body: {exc}") from exc
        if not isinstance(body, dict):
            raise APIError(400, "the body must be a JSON object")
        unknown = set(body) - set(known)
        if unknown:
            raise APIError(400, f"unknown fields: {sorted(unknown)}", param=sorted(unknown)[0])
        return body

    def _weights_path(self, raw: Any) -> Path:
        if not isinstance(raw, str) or not raw:
            raise APIError(400, "'path' must name a safetensors file or directory", param="path")
        if self.allowed_dir is None:
            raise APIError(403, "weight updates from paths need --allowed-weights-dir", "permission_error",
                           "path", code="path_not_allowed")
        path = Path(raw)
        # Relative paths are taken inside the allowed dir; resolve() follows every symlink.
        resolved = (path if path.is_absolute() else self.allowed_dir / path).resolve()
        if not resolved.is_relative_to(self.allowed_dir):
            raise APIError(403, f"path {raw!r} is outside the allowed weights directory", "permission_error",
                           "path", code="path_not_allowed")
        if not resolved.exists():
            raise APIError(404, f"no such weights file or directory: {raw!r}", "not_found_error", "path",
                           code="not_found")
        return resolved

    async def _read_body(self, request: web.Request) -> bytes:
        """The body read in chunks, bounded by max_weights_bytes (not the app's JSON limit)."""
        if request.content_length is not None and request.content_length > self.max_weights_bytes:
            raise APIError(413, f"weights body over {self.max_weights_bytes} bytes", code="request_too_large")
        buf = bytearray()
        while chunk := await request.content.read(_CHUNK):
            buf += chunk
            if len(buf) > self.max_weights_bytes:
                raise APIError(413, f"weights body over {self.max_weights_bytes} bytes", code="request_too_large")
        if not buf:
            raise APIError(400, "empty safetensors body")
        return bytes(buf)
