"""vLLM's weight-transfer protocol at the replica front: one gloo group spanning the
trainer and every replica, so the weights travel once (one broadcast) however many
replicas there are.

The trainer sees N engine ranks (`GET /get_world_size` -> N) and inits a group of world
size 1 + N; the front forwards the init to replica i with `rank_offset + i`, and every
other call (start, update, finish) to all of them at once (a broadcast needs every rank
inside it). Finish is two-phase as the group's own updates are: pause all (keep) ->
finish all -> resume all, so versions stay in lockstep; a replica that fails it leaves
routing. Each replica serves the protocol itself (api/weight_transfer.py) behind the
group's internal admin key.
"""
from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import aiohttp
import orjson
from aiohttp import web

from api.protocol import APIError
from api.weight_transfer import json_body
from asyncengine.distributed.group import Replica, ReplicaGroup


def _json(obj: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(obj), status=status, content_type="application/json")


class FrontTransfer:
    """What api/admin.py calls for the protocol (routes, update, cleanup), fanned out."""

    def __init__(self, group: ReplicaGroup, http: Callable[[], aiohttp.ClientSession]) -> None:
        self.group = group
        self.http = http
        self.members: list[Replica] = []  # the replicas in the group the last init made

    def routes(self) -> list[tuple[str, str, Any]]:
        return [("GET", "/get_world_size", self.world_size), ("GET", "/server_info", self.server_info),
                ("POST", "/init_weight_transfer_engine", self.init), ("POST", "/start_weight_update", self.start),
                ("POST", "/finish_weight_update", self.finish)]

    async def cleanup(self, app: web.Application) -> None:
        self.members = []

    async def world_size(self, request: web.Request) -> web.Response:
        return _json({"world_size": len(self.group.up_replicas())})

    async def server_info(self, request: web.Request) -> web.Response:
        live = self.group.up_replicas()
        if not live:
            raise APIError(503, "no replica is available", "server_error", code="no_replica")
        [(status, body)] = await self._call([live[0]], "GET", request.path_qs, None)
        if status == 200:
            body.setdefault("vllm_config", {}).setdefault("parallel_config", {})["data_parallel_size"] = len(live)
        return _json(body, status)

    async def init(self, request: web.Request) -> web.Response:
        body = await json_body(request)
        info = body.get("init_info")
        if not isinstance(info, dict) or not isinstance(info.get("rank_offset"), int):
            raise APIError(400, "init_info must be an object {master_address, master_port, rank_offset, world_size}",
                           param="init_info")
        self.members = self.group.up_replicas()
        bodies = [{**body, "init_info": {**info, "rank_offset": info["rank_offset"] + i}}
                  for i in range(len(self.members))]
        results = await asyncio.gather(*(self._call([r], "POST", request.path, b) for r, b in zip(self.members, bodies)))
        return self._settle([res for [res] in results], {"world_size": info.get("world_size"),
                                                          "ranks": [b["init_info"]["rank_offset"] for b in bodies]})

    async def start(self, request: web.Request) -> web.Response:
        return self._settle(await self._call(self._members(), "POST", request.path, await json_body(request)))

    async def update(self, body: dict[str, Any]) -> web.Response:
        """POST /update_weights {"update_info"}: every rank receives the one broadcast."""
        return self._settle(await self._call(self._members(), "POST", "/update_weights", body))

    async def finish(self, request: web.Request) -> web.Response:
        body = await json_body(request)
        members = self._members()
        async with self.group.lock:
            await self.group.pause("keep")
            try:
                results = await self._call(members, "POST", request.path, body)
            finally:
                await self.group.resume()
            ok = [(r, b) for r, (status, b) in zip(members, results) if status == 200]
            if not ok:
                return self._settle(results)
            version = max(int(b["weight_version"]) for _, b in ok)
            for r, (status, b) in zip(members, results):
                if status != 200 or int(b.get("weight_version", -1)) != version:
                    self.group.mark_failed(r.index, f"finish_weight_update gave {status}: {b}")
            self.group.transferred(version)
        return _json({**ok[0][1], "weight_version": version, "replicas": len(ok)})

    def _members(self) -> list[Replica]:
        live = [r for r in self.members if r.up and r in self.group.replicas]
        if not self.members:
            raise APIError(409, "no weight-transfer group: POST /init_weight_transfer_engine first",
                           code="no_transfer_group")
        if len(live) != len(self.members):
            raise APIError(409, "a replica of the transfer group left; init the group again",
                           code="transfer_group_broken")
        return live

    async def _call(self, replicas: list[Replica], method: str, path: str, body: Any) -> list[tuple[int, Any]]:
        """The same call on each replica's admin endpoint, all at once: [(status, body)]."""
        headers = {"Authorization": f"Bearer {self.group.admin_key}", "Content-Type": "application/json"}

        async def one(r: Replica) -> tuple[int, Any]:
            try:
                async with self.http().request(method, r.url + path, headers=headers,
                                               data=None if body is None else orjson.dumps(body)) as resp:
                    return resp.status, orjson.loads(await resp.read())
            except (aiohttp.ClientError, OSError, orjson.JSONDecodeError) as exc:
                self.group.mark_failed(r.index, f"{path} failed: {exc!r}")
                return 502, {"error": {"message": f"replica {r.index} failed: {exc!r}", "type": "server_error",
                                       "param": None, "code": "replica_failed"}}

        return list(await asyncio.gather(*(one(r) for r in replicas)))

    @staticmethod
    def _settle(results: list[tuple[int, Any]], extra: dict[str, Any] | None = None) -> web.Response:
        """The first failure as is (its status and OpenAI-style body), else the first answer."""
        for status, body in results:
            if status != 200:
                return _json(body, status)
        return _json({**results[0][1], **(extra or {}), "replicas": len(results)})

