"""One OpenAI-compatible front for a replica group: route, proxy, fan out, survive.

Every path the single server has is proxied, byte for byte and streaming, to the replica
the Router picks (session id, prompt prefix, load). The admin endpoints, when an admin key
is set, are the single server's own (api/admin.py) over a facade that fans each call out
to the group. A replica that cannot be reached before anything was sent to the client is
retried on another; one that dies mid-stream ends that stream with an error event. Either
way it leaves routing and a replacement is started; `/health` says "degraded" meanwhile.
"""
from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator, Mapping
from typing import Any

import aiohttp
import orjson
from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from api.protocol import APIError
from api.server import json_response
from asyncengine.distributed.group import ReplicaGroup
from asyncengine.distributed.router import NoReplicaError, Router, prefix_key

log = logging.getLogger(__name__)
# Hop-by-hop and length headers are the proxy's own business on each side.
_DROP = {"host", "content-length", "transfer-encoding", "connection", "keep-alive", "content-encoding"}
_ADMIN_PATHS = {"/pause", "/resume", "/is_paused", "/reset_prefix_cache", "/update_weights",
                "/weight_version", "/weight_checksums", "/get_world_size", "/server_info",
                "/init_weight_transfer_engine", "/start_weight_update", "/finish_weight_update"}


class _Unreachable(Exception):
    """The replica failed before any byte reached the client (safe to retry elsewhere)."""


class GroupEngine:
    """What api/admin.py needs of an engine, fanned out over a ReplicaGroup."""

    def __init__(self, group: ReplicaGroup) -> None:
        self.group = group
        self._paused = False

    async def pause(self, mode: str = "keep") -> None:
        await self.group.pause(mode)
        self._paused = True

    async def resume(self) -> None:
        await self.group.resume()
        self._paused = False

    def is_paused(self) -> bool:
        return self._paused

    async def reset_prefix_cache(self) -> None:
        await self.group.reset_prefix_cache()

    async def call(self, fn: Any) -> list[Any]:
        """fn(core) on every replica's engine thread (the front's own functions, never a
        client's: Ray pickles them to the replicas)."""
        return await self.group.call_all("call", fn)

    @property
    def weight_version(self) -> int:
        return self.group.weight_version

    async def weight_checksums(self) -> dict[str, str]:
        sums = await self.group.call_all("weight_checksums")
        if not sums:
            raise APIError(503, "no replica is available", "server_error", code="no_replica")
        if any(s != sums[0] for s in sums[1:]):  # lockstep broken: say so rather than pick one
            raise APIError(500, "replicas serve different weights", "server_error", code="replica_mismatch")
        return sums[0]

    async def update_weights(self, weights: Any, mode: str = "keep", load_format: str = "hf") -> int:
        from asyncengine.models.weights import read_weight_source
        from asyncengine.sampling_params import InvalidRequestError

        if load_format not in ("hf", "auto"):
            raise InvalidRequestError(f"load_format must be 'hf' (HF tensor names), got {load_format!r}",
                                      "load_format")
        state = weights if isinstance(weights, Mapping) else await asyncio.to_thread(read_weight_source, weights)
        return await self.group.update_weights(state, mode)


class Front:
    """The aiohttp application over a group; see the module docstring."""

    def __init__(self, group: ReplicaGroup, tokenizer: Any | None, block_size: int, prefix_blocks: int = 2,
                 admin_key: str | None = None, allowed_weights_dir: Any = None, auto_replace: bool = True,
                 rebalance_margin: int = 4) -> None:
        self.group = group
        self.router = Router(len(group.replicas), rebalance_margin=rebalance_margin)
        self.tokenizer = tokenizer
        self.block_size = block_size
        self.prefix_blocks = prefix_blocks
        self.auto_replace = auto_replace
        self.admin_key = admin_key
        self.allowed_weights_dir = allowed_weights_dir
        self.replica_stats: dict[int, dict[str, float]] = {}
        self.http_metrics = _FrontMetrics(self)
        self._replacing: dict[int, asyncio.Task[Any]] = {}
        self._http: aiohttp.ClientSession | None = None
        self._monitor: asyncio.Task[None] | None = None
        group.on_down = self._on_down
        group.on_up = self.router.mark_up

    def app(self) -> web.Application:
        from api.admin import add_admin_routes

        from api.server import _error_middleware

        app = web.Application(client_max_size=1024**3, middlewares=[_error_middleware(self.http_metrics)])
        app.router.add_get("/health", self.health)
        app.router.add_get("/metrics", self.metrics)
        from asyncengine.distributed.transfer import FrontTransfer

        transfer = FrontTransfer(self.group, self._session)
        add_admin_routes(app, GroupEngine(self.group), self.admin_key, self.allowed_weights_dir,  # type: ignore[arg-type]
                         transfer=transfer)
        app.router.add_route("*", "/{tail:.*}", self.proxy)
        app.on_startup.append(self._open)
        app.on_cleanup.append(self._close)
        return app

    def _session(self) -> aiohttp.ClientSession:
        assert self._http is not None, "the front's app is not started"
        return self._http

    async def _open(self, _: web.Application) -> None:
        self._http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None, sock_connect=10))
        self._monitor = asyncio.get_running_loop().create_task(self._watch())

    async def _close(self, _: web.Application) -> None:
        for task in [*self._replacing.values(), *([self._monitor] if self._monitor else [])]:
            task.cancel()
        if self._http is not None:
            await self._http.close()

    # -- membership ---------------------------------------------------------------
    def _on_down(self, index: int) -> None:
        self.router.mark_down(index)
        if self.auto_replace and index not in self._replacing:
            self._replacing[index] = asyncio.get_running_loop().create_task(self._replace(index))

    async def _watch(self, period_s: float = 2.0) -> None:
        """Probe every replica in routing; one that does not answer in time leaves it."""
        while True:
            await asyncio.sleep(period_s)
            for r in self.group.up_replicas():
                try:
                    healthy = await asyncio.wait_for(r.actor.health.remote(), 10 * period_s)
                except Exception as exc:
                    healthy, why = False, repr(exc)
                else:
                    why = "its engine is unhealthy"
                if not healthy:
                    self.group.mark_failed(r.index, why)

    async def _replace(self, index: int) -> None:
        try:
            await self.group.replace(index)
            log.info("replica %d replaced and back in routing", index)
        except Exception:
            log.exception("replacing replica %d failed; it stays out of routing", index)
        finally:
            self._replacing.pop(index, None)

    # -- endpoints ----------------------------------------------------------------
    async def health(self, request: web.Request) -> web.Response:
        up = self.router.up_replicas()
        status = "ok" if len(up) == len(self.group.replicas) else "degraded" if up else "unavailable"
        body = {"status": status, "replicas": [{"index": i, "up": r.up, "load": r.load}
                                               for i, r in enumerate(self.router.replicas)]}
        return json_response(body, 200 if up else 503)

    async def metrics(self, request: web.Request) -> web.Response:
        stats = await self.group.call_all("stats")
        live = [r.index for r in self.group.up_replicas()]
        self.replica_stats = dict(zip(live, stats))
        return web.Response(body=generate_latest(self.http_metrics.registry), content_type="text/plain")

    async def proxy(self, request: web.Request) -> web.StreamResponse:
        if request.path in _ADMIN_PATHS:  # admin disabled: as absent as on one server
            raise APIError(404, f"Not found: {request.path}", "not_found_error", code="not_found")
        body = await request.read()
        session, prefix = self._route_keys(request, body)
        tried: set[int] = set()
        while True:
            try:
                index = self.router.choose(session, prefix, exclude=frozenset(tried))
            except NoReplicaError as exc:
                raise APIError(503, str(exc), "server_error", code="no_replica",
                               headers={"Retry-After": "1"}) from exc
            self.router.start(index)
            try:
                return await self._forward(request, body, index)
            except _Unreachable as exc:
                tried.add(index)
                self.group.mark_failed(index, f"unreachable: {exc}")
            finally:
                self.router.finish(index)

    async def _forward(self, request: web.Request, body: bytes, index: int) -> web.StreamResponse:
        assert self._http is not None
        url = self.group.replicas[index].url + request.path_qs
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _DROP}
        try:
            upstream = await self._http.request(request.method, url, data=body, headers=headers)
        except (aiohttp.ClientError, OSError) as exc:
            raise _Unreachable(repr(exc)) from exc
        async with upstream:
            resp = web.StreamResponse(status=upstream.status, headers={
                **{k: v for k, v in upstream.headers.items() if k.lower() not in _DROP},
                "X-Replica": str(index)})
            sse = upstream.headers.get("Content-Type", "").startswith("text/event-stream")
            try:
                first = await upstream.content.readany()
            except (aiohttp.ClientError, OSError) as exc:
                raise _Unreachable(repr(exc)) from exc
            await resp.prepare(request)
            try:
                chunk = first
                while chunk:
                    await resp.write(chunk)
                    chunk = await upstream.content.readany()
            except (aiohttp.ClientError, OSError) as exc:  # died mid-stream: bytes already sent
                self.group.mark_failed(index, f"lost mid-stream: {exc!r}")
                if sse:
                    await resp.write(_sse_error(index))
                return resp
            await resp.write_eof()
            return resp

    def _route_keys(self, request: web.Request, body: bytes) -> tuple[str | None, str | None]:
        session = request.headers.get("X-Session-ID")
        try:
            data = orjson.loads(body) if body else None
        except orjson.JSONDecodeError:
            return session, None
        if not isinstance(data, dict):
            return session, None
        if session is None and isinstance(data.get("session_id"), str):
            session = data["session_id"]
        ids = self._prompt_ids(data)
        return session, prefix_key(ids, self.block_size, self.prefix_blocks) if ids else None

    def _prompt_ids(self, data: dict[str, Any]) -> list[int] | None:
        """The prompt's leading token ids, as well as the front can tell (only routing
        depends on it: a prompt the replica will reject routes anywhere)."""
        prompt = data.get("token_ids", data.get("prompt"))
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], list):
            prompt = prompt[0]
        if isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
            return prompt
        if self.tokenizer is None:
            return None
        try:
            if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
                prompt = prompt[0]
            if isinstance(prompt, str):
                return list(self.tokenizer(prompt[: 64 * self.block_size * self.prefix_blocks]).input_ids)
            if isinstance(data.get("messages"), list):
                return list(self.tokenizer.apply_chat_template(data["messages"], tokenize=True,
                                                               add_generation_prompt=True))
        except Exception:  # malformed messages: the replica gives the real error
            return None
        return None


def _sse_error(index: int) -> bytes:
    err = {"error": {"message": f"replica {index} failed while streaming; retry the request",
                     "type": "server_error", "param": None, "code": "replica_failed"}}
    return b"data: " + orjson.dumps(err) + b"\n\ndata: [DONE]\n\n"


class _FrontMetrics:
    """The front's registry: HTTP requests per endpoint and status (counted by the single
    server's error middleware), and the per-replica collector below."""

    def __init__(self, front: Front) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("asyncengine_front_requests", "HTTP requests at the front",
                                ["endpoint", "status"], registry=self.registry)
        self.registry.register(_FrontCollector(front))


class _FrontCollector(Collector):
    """Per-replica routing and cache figures, read at scrape time."""

    def __init__(self, front: Front) -> None:
        self.front = front

    def collect(self) -> Iterator[Metric]:
        families = {
            "up": "1 while the replica is in routing", "load": "Requests in flight through the front",
            "routed": "Requests routed to the replica", "prefix_routed": "Requests routed by prompt prefix",
            "prefix_cache_hit_rate": "The replica engine's prefix-cache hit tokens / queried tokens",
            "prefix_cache_hits": "Prompt tokens the replica served from its prefix cache",
            "prefix_cache_queries": "Prompt tokens the replica looked up in its prefix cache",
            "weight_version": "Version of the weights the replica serves",
        }
        gauges = {k: GaugeMetricFamily(f"asyncengine_replica_{k}", doc, labels=["replica"])
                  for k, doc in families.items()}
        for i, r in enumerate(self.front.router.replicas):
            label = [str(i)]
            gauges["up"].add_metric(label, float(r.up))
            gauges["load"].add_metric(label, float(r.load))
            gauges["routed"].add_metric(label, float(r.routed))
            gauges["prefix_routed"].add_metric(label, float(r.prefix_routed))
            s = self.front.replica_stats.get(i)
            if s is not None:
                q, h = s["prefix_query_tokens"], s["prefix_hit_tokens"]
                gauges["prefix_cache_hit_rate"].add_metric(label, h / q if q else 0.0)
                gauges["prefix_cache_hits"].add_metric(label, float(h))
                gauges["prefix_cache_queries"].add_metric(label, float(q))
                gauges["weight_version"].add_metric(label, float(s["weight_version"]))
        yield from gauges.values()
