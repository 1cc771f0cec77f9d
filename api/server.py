"""The OpenAI-compatible HTTP server (aiohttp): app factory, CLI flags and entry point.

The engine modules (torch) are imported lazily, so building the CLI parser stays cheap.
"""
from __future__ import annotations

import argparse
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import orjson
from aiohttp import web

from api.protocol import APIError

if TYPE_CHECKING:
    from asyncengine.async_engine import AsyncEngine
    from asyncengine.config import EngineConfig
    from asyncengine.reliability.faults import FaultHook

log = logging.getLogger(__name__)
DEFAULT_MAX_BODY_BYTES = 32 * 2**20
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

ENGINE_KEY: web.AppKey[Any] = web.AppKey("engine", object)
METRICS_KEY: web.AppKey[Any] = web.AppKey("metrics", object)


def add_serve_args(parser: argparse.ArgumentParser) -> None:
    """Server flags of `asyncengine serve` (engine flags come from cli.add_engine_args)."""
    parser.add_argument("--host", default="127.0.0.1", help="bind address (default: localhost only)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--served-model-name", nargs="+", default=None,
                        help="model name(s) clients may send (default: the model path or directory name)")
    parser.add_argument("--max-waiting", type=int, default=None,
                        help="bound of the waiting queue; past it requests get 503 + Retry-After")
    parser.add_argument("--max-body-mb", type=float, default=DEFAULT_MAX_BODY_BYTES / 2**20,
                        help="largest request body (413 beyond)")
    parser.add_argument("--admin-key", default=None,
                        help="enable the RL admin endpoints (api/admin.py), which then need 'Bearer KEY'")
    parser.add_argument("--allowed-weights-dir", default=None,
                        help="directory that /update_weights may read safetensors paths from")
    parser.add_argument("--access-log", action="store_true", help="log every HTTP request")
    parser.add_argument("--no-uvloop", action="store_true", help="use the default asyncio event loop")
    from asyncengine.distributed.serve import add_replica_args

    add_replica_args(parser)
    from api.tools.parsers import PARSERS

    parser.add_argument("--tool-call-parser", default=None, choices=sorted(PARSERS),
                        help="parser of tool calls in chat replies (api/tools; default: chosen by the chat template)")
    parser.add_argument("--strict-request-fields", action="store_true",
                        help="answer unknown request fields with 400 instead of ignoring them with a warning")
    add_reliability_args(parser)


def add_reliability_args(parser: argparse.ArgumentParser) -> None:
    """Keys, limits, queue time and shutdown (api/auth.py, api/limits.py, api/shutdown.py)."""
    from api.limits import Limits

    d = Limits()
    parser.add_argument("--api-key", default=None,
                        help="require 'Authorization: Bearer KEY' on the inference endpoints (not the admin key)")
    parser.add_argument("--shutdown-timeout", type=float, default=30.0,
                        help="on SIGTERM, drain in-flight requests for at most S seconds, then abort the rest")
    parser.add_argument("--max-queue-seconds", type=float, default=None,
                        help="requests waiting longer than this before being scheduled get 503")
    parser.add_argument("--max-request-tokens", type=int, default=d.max_request_tokens,
                        help="largest prompts x n x max_tokens of one request (400 beyond)")
    parser.add_argument("--max-stop-strings", type=int, default=d.max_stop_strings, help="stop strings per request")
    parser.add_argument("--max-stop-chars", type=int, default=d.max_stop_chars, help="longest stop string")
    parser.add_argument("--max-logprobs", type=int, default=d.max_logprobs, help="most top logprobs per token")
    parser.add_argument("--max-header-bytes", type=int, default=d.max_header_bytes,
                        help="longest request line or header field")
    parser.add_argument("--max-headers", type=int, default=d.max_headers, help="most header fields per request")


def create_app(
    engine: AsyncEngine, served_model_names: list[str] | None = None, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    shutdown_engine: bool = False, tool_call_parser: str | None = None, strict_request_fields: bool = False,
) -> web.Application:
    """The aiohttp application serving `engine`; with shutdown_engine the app's cleanup stops it.
    `tool_call_parser` names a parser of api/tools (None: chosen by the chat template);
    `strict_request_fields` answers unknown request fields with 400 instead of ignoring them."""
    from api.generation import GenerationHandler
    from api.metrics import Metrics
    from api.tito import TitoHandler

    names = served_model_names or [engine.core.model_dir.name]
    metrics = Metrics(engine.stats, lambda: engine.is_healthy)
    engine.step_observer = metrics.observe_step
    app = web.Application(client_max_size=max_body_bytes, middlewares=[_error_middleware(metrics)])
    app[ENGINE_KEY] = engine
    app[METRICS_KEY] = metrics
    gen = GenerationHandler(engine, metrics, names, strict_request_fields, tool_call_parser)
    info = _Info(engine, names)
    app.router.add_post("/v1/completions", gen.completions)
    app.router.add_post("/v1/chat/completions", gen.chat)
    app.router.add_post("/inference/v1/generate", TitoHandler(gen).generate)
    app.router.add_get("/v1/models", info.models)
    app.router.add_get("/health", info.health)
    app.router.add_get("/metrics", info.metrics(metrics))
    app.router.add_post("/tokenize", info.tokenize)
    app.router.add_post("/detokenize", info.detokenize)
    app.router.add_get("/tokenizer_info", info.tokenizer_info)
    from api.sessions import add_session_routes

    add_session_routes(app, gen)  # session_id on chat completions; GET / DELETE /v1/sessions/{id}
    if shutdown_engine:
        async def _stop(_: web.Application) -> None:
            engine.shutdown()

        app.on_cleanup.append(_stop)
    return app


def json_response(obj: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(body=orjson.dumps(obj), status=status, content_type="application/json", headers=headers)


def _error_middleware(metrics: Any) -> Any:
    """Every error leaves as OpenAI-style JSON; also counts requests per endpoint and status."""

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        endpoint = request.match_info.route.resource.canonical if request.match_info.route.resource else "unknown"
        try:
            resp = await handler(request)
        except APIError as exc:
            resp = json_response(exc.body(), exc.status, exc.headers)
        except web.HTTPException as exc:  # 404 route, 405 method, 413 body too large, ...
            if exc.status < 400:
                raise
            resp = json_response(_http_error(exc).body(), exc.status)
        except Exception as exc:  # a bug: say so in JSON, never crash the server
            log.exception("unhandled error on %s", request.path)
            resp = json_response(APIError(500, f"internal error: {exc!r}", "server_error").body(), 500)
        metrics.requests.labels(endpoint, str(resp.status)).inc()
        return resp

    return middleware


def _http_error(exc: web.HTTPException) -> APIError:
    if exc.status == 413:
        return APIError(413, f"Request body too large: {exc.text}", code="request_too_large")
    if exc.status == 404:
        return APIError(404, f"Not found: {exc.reason}", "not_found_error", code="not_found")
    if exc.status == 405:
        return APIError(405, "Method not allowed", code="method_not_allowed")
    return APIError(exc.status, exc.reason or "HTTP error", "invalid_request_error")


class _Info:
    """Models, health, metrics and tokenizer endpoints."""

    def __init__(self, engine: AsyncEngine, names: list[str]) -> None:
        self.engine = engine
        self.names = names
        self.created = int(time.time())

    async def models(self, request: web.Request) -> web.Response:
        data = [{"id": n, "object": "model", "created": self.created, "owned_by": "asyncengine",
                 "root": str(self.engine.core.model_dir), "max_model_len": self.engine.model_info.max_model_len}
                for n in self.names]
        return json_response({"object": "list", "data": data})

    async def health(self, request: web.Request) -> web.Response:
        if self.engine.is_healthy:
            return json_response({"status": "ok"})
        err = APIError(503, f"engine unhealthy: {self.engine.dead_error!r}", "server_error", code="engine_dead")
        return json_response(err.body(), 503)

    def metrics(self, metrics: Any) -> Handler:
        from prometheus_client import CONTENT_TYPE_LATEST

        async def handler(request: web.Request) -> web.Response:
            return web.Response(body=metrics.render(), headers={"Content-Type": CONTENT_TYPE_LATEST})

        return handler

    async def tokenize(self, request: web.Request) -> web.Response:
        from api.tokens import tokenize

        return json_response(await tokenize(request, self.engine))

    async def detokenize(self, request: web.Request) -> web.Response:
        from api.tokens import detokenize

        return json_response(await detokenize(request, self.engine))

    async def tokenizer_info(self, request: web.Request) -> web.Response:
        from api.tokens import tokenizer_info

        return json_response(tokenizer_info(self.engine))


def serve(args: argparse.Namespace, config: EngineConfig, faults: FaultHook | None = None) -> None:
    """`asyncengine serve`: load the engine, then serve HTTP until interrupted.

    `faults` is the fault-injection test hook (asyncengine/reliability/faults.py), for
    tests that run a real server process; the CLI never sets it."""
    from asyncengine.async_engine import AsyncEngine

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if getattr(args, "max_waiting", None) is not None:
        config = config.with_options(max_waiting=args.max_waiting)
    if getattr(args, "max_queue_seconds", None) is not None:
        config = config.with_options(max_queue_seconds=args.max_queue_seconds)
    use_uvloop = not getattr(args, "no_uvloop", False)
    from asyncengine.distributed.serve import serve_replicated, wants_replicas

    names = args.served_model_name or ([args.model] if args.model else None)
    if wants_replicas(args):  # N engines as Ray actors behind one front
        return serve_replicated(args, config, names, app_options(args))
    engine = AsyncEngine.from_config(config, faults=faults)
    names = names or [engine.core.model_dir.name]
    app = create_app(engine, names, shutdown_engine=True, **app_options(args))
    _add_admin(app, engine, args)
    limits = _add_reliability(app, engine, args)
    loop = _new_loop(use_uvloop)
    log.info("serving %s on http://%s:%d (event loop: %s)", names[0], args.host, args.port, type(loop).__module__)
    from api.limits import run_options

    access_log = logging.getLogger("aiohttp.access") if getattr(args, "access_log", False) else None
    # After the drain (api/shutdown.py) every request has ended; shutdown_timeout bounds the rest.
    web.run_app(app, host=args.host, port=args.port, loop=loop, shutdown_timeout=5.0,
                **run_options(limits, access_log))
    if engine.dead_error is not None:  # stopped after a fatal engine error: say so in the exit code
        log.error("exiting after a fatal engine error: %r", engine.dead_error)
        raise SystemExit(1)


def _add_reliability(app: web.Application, engine: AsyncEngine, args: argparse.Namespace) -> Any:
    """--api-key, the request limits and the SIGTERM drain; returns the Limits."""
    from api.auth import add_api_key
    from api.limits import LIMITS_KEY
    from api.shutdown import add_graceful_shutdown

    limits = limits_from_args(args)
    app[LIMITS_KEY] = limits
    add_api_key(app, getattr(args, "api_key", None))
    add_graceful_shutdown(app, engine, float(getattr(args, "shutdown_timeout", 30.0)))
    return limits


def limits_from_args(args: argparse.Namespace) -> Any:
    """api.limits.Limits from the serve flags (defaults for flags a caller did not add)."""
    from api.limits import Limits

    d = Limits()
    return Limits(**{f: getattr(args, f, getattr(d, f)) for f in Limits.__dataclass_fields__})


def app_options(args: argparse.Namespace) -> dict[str, Any]:
    """create_app's keyword options from the serve flags (one server, or each replica)."""
    return {
        "max_body_bytes": int(getattr(args, "max_body_mb", DEFAULT_MAX_BODY_BYTES / 2**20) * 2**20),
        "tool_call_parser": getattr(args, "tool_call_parser", None),
        "strict_request_fields": getattr(args, "strict_request_fields", False),
    }


def _add_admin(app: web.Application, engine: AsyncEngine, args: argparse.Namespace) -> None:
    """The admin endpoints exist only with --admin-key (they are 404 otherwise)."""
    from pathlib import Path

    from api.admin import add_admin_routes

    key = getattr(args, "admin_key", None)
    allowed = getattr(args, "allowed_weights_dir", None)
    add_admin_routes(app, engine, key, Path(allowed) if allowed else None)
    if key:
        log.info("admin endpoints enabled (weights from %s)", allowed or "nowhere: no --allowed-weights-dir")


def _new_loop(use_uvloop: bool) -> Any:
    """A fresh event loop: uvloop when installed (faster I/O for many SSE streams)."""
    import asyncio

    if use_uvloop:
        try:
            import uvloop

            return uvloop.new_event_loop()
        except ImportError:
            log.info("uvloop is not installed; using asyncio's default loop")
    return asyncio.new_event_loop()
