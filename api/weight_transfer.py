"""vLLM's weight-transfer protocol over HTTP, on a CPU gloo transport (behind the admin key).

    GET  /get_world_size                      {"world_size": 1}
    GET  /server_info?config_format=json      {"vllm_config": {"weight_transfer_config": {"backend": "gloo"}, ...}}
    POST /init_weight_transfer_engine         {"init_info": {master_address, master_port, rank_offset, world_size}}
    POST /start_weight_update                 {} (anything else in the body is ignored)
    POST /update_weights                      {"update_info": {names, dtype_names, shapes, packed?}}
    POST /finish_weight_update                {"weight_version"?, "mode"?: keep|recompute|abort}

finish's optional weight_version is the trainer's label for the new weights: it must be
above the serving version (versions only go up), and the tokens then carry it; without
it the version goes up by one.

update_info's packed=true is vLLM's packed layout (asyncengine/rl/protocol.py): one
uint8 broadcast per bucket instead of one per tensor. Either way the tensors are received
back to back into one kept buffer (asyncengine/rl/buffers.py) and, for a full update in
the model's dtype, become the new weights without a copy (asyncengine/rl/staging.py);
nothing the engine serves changes before finish, which swaps them in at a step
boundary. A failed step (bad body, wrong shapes, the trainer dead or stalled past the
timeout) ends the update: the old weights keep serving, and a broken group is left, so
the next init can start afresh.
"""
from __future__ import annotations

import asyncio
import math
import time
from typing import TYPE_CHECKING, Any

import orjson
import torch
from aiohttp import web

from api.protocol import APIError
from asyncengine.rl.buffers import SpareBuffers
from asyncengine.rl.protocol import InitInfo, TransferError, UpdateInfo

if TYPE_CHECKING:
    from asyncengine.async_engine import AsyncEngine
    from asyncengine.rl.gloo import GlooGroup

DEFAULT_TIMEOUT_S = 120.0
FINISH_MODES = ("keep", "recompute", "abort")


def _json(obj: Any) -> web.Response:
    return web.Response(body=orjson.dumps(obj), content_type="application/json")


def _api_error(exc: TransferError) -> APIError:
    kind = "invalid_request_error" if exc.status < 500 else "server_error"
    return APIError(exc.status, f"{exc} (the old weights are still serving)", kind, exc.param, exc.code)


async def json_body(request: web.Request) -> dict[str, Any]:
    """The JSON object of a request body ({} when empty); 400 otherwise."""
    raw = await request.read()
    if not raw.strip():
        return {}
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise APIError(400, f"invalid JSON body: {exc}") from exc
    if not isinstance(body, dict):
        raise APIError(400, "the body must be a JSON object")
    return body


class WeightTransfer:
    """The protocol's state: the group (after init) and the staged tensors (after start)."""

    def __init__(self, engine: AsyncEngine, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        self.engine = engine
        self.timeout_s = timeout_s
        self.group: GlooGroup | None = None
        self.staged: dict[str, Any] | None = None  # None: no update in progress
        self.started_at = 0.0
        self.receive_s = 0.0  # time in update_weights calls since start (the broadcasts)
        self._calls = 0  # update_weights calls since start: each receives into its own buffer
        self._finishing = False  # a finish is staging / swapping: the spare buffers are in use
        self.spares = SpareBuffers()
        self._busy = asyncio.Lock()  # one collective (init or receive) at a time

    def routes(self) -> list[tuple[str, str, Any]]:
        return [("GET", "/get_world_size", self.world_size), ("GET", "/server_info", self.server_info),
                ("POST", "/init_weight_transfer_engine", self.init), ("POST", "/start_weight_update", self.start),
                ("POST", "/finish_weight_update", self.finish)]

    async def world_size(self, request: web.Request) -> web.Response:
        return _json({"world_size": 1})

    async def server_info(self, request: web.Request) -> web.Response:
        cfg = self.engine.config
        return _json({"vllm_config": {
            "weight_transfer_config": {"backend": "gloo"},
            "model_config": {"model": str(self.engine.core.model_dir), "dtype": cfg.dtype,
                             "logprobs_mode": "processed_logprobs", "max_model_len": self.engine.model_info.max_model_len},
            "cache_config": {"block_size": cfg.block_size, "enable_prefix_caching": cfg.enable_prefix_caching},
            "parallel_config": {"world_size": 1, "tensor_parallel_size": 1, "data_parallel_size": 1},
        }, "weight_version": self.engine.weight_version})

    async def cleanup(self, app: web.Application) -> None:
        """On app shutdown: leave the group (torch.distributed state is per process, and
        e.g. transformers' save_pretrained writes nothing on a rank other than 0)."""
        self.staged = None
        if not self._busy.locked():
            self._close_group()

    def _close_group(self) -> None:
        if self.group is not None:
            self.group.close()
            self.group = None

    async def init(self, request: web.Request) -> web.Response:
        from asyncengine.rl.gloo import GlooGroup

        info = self._parse(InitInfo.parse, (await json_body(request)).get("init_info"))
        if self._busy.locked():
            raise APIError(409, "a weight transfer is in progress; init after it ends", code="transfer_in_progress")
        async def join() -> None:
            async with self._busy:
                self.staged = None  # a new group ends any update begun on the old one
                self._close_group()
                self.group = await asyncio.to_thread(GlooGroup, info, self.timeout_s)

        try:
            await asyncio.shield(asyncio.ensure_future(join()))  # settles even if the caller hangs up
        except TransferError as exc:
            raise _api_error(exc) from exc
        return _json({"status": "ok", "rank": info.rank_offset, "world_size": info.world_size})

    async def start(self, request: web.Request) -> web.Response:
        await json_body(request)  # validated as JSON; fields such as is_checkpoint_format are ignored
        if self.group is None:
            raise APIError(409, "no weight-transfer group: POST /init_weight_transfer_engine first",
                           code="no_transfer_group")
        if self.staged is not None or self._finishing:
            raise APIError(409, "a weight update is already in progress (start_weight_update was called and "
                                "finish_weight_update has not returned)", code="update_in_progress")
        self.staged, self.started_at, self.receive_s, self._calls = {}, time.perf_counter(), 0.0, 0
        return _json({"status": "ok"})

    async def update(self, body: dict[str, Any]) -> web.Response:
        """POST /update_weights {"update_info"}: receive the announced tensors."""
        from asyncengine.rl.staging import layout_rank

        if self.group is None or self.staged is None:
            raise APIError(409, "no weight update in progress: init_weight_transfer_engine, then "
                                "start_weight_update first", code="no_update_in_progress")
        if self._busy.locked():  # the receive under way owns the group: leave it alone
            raise APIError(409, "another update_weights is receiving; send one at a time",
                           code="transfer_in_progress")
        try:
            update = UpdateInfo.parse(body.get("update_info"))
            self._check_size(update)
        except TransferError as exc:
            self._fail(close=True)  # the trainer is broadcasting what we will not receive: hang up
            raise _api_error(exc) from exc
        flat = self.spares.get(("recv", self._calls), sum(update.sizes()))
        self._calls += 1
        t0 = time.perf_counter()
        # Shielded: if the trainer hangs up, aiohttp cancels this handler, but the receive
        # must still run to its end (or its error) and settle the update's state.
        task = asyncio.ensure_future(self._receive(self.group, update, flat, layout_rank(self.engine.core.model)))
        try:
            received = await asyncio.shield(task)
        except TransferError as exc:
            raise _api_error(exc) from exc
        problems = update.mismatches(self._shapes())
        if problems:  # everything was received, so the group is still in step with the trainer
            self._fail(close=False)
            raise APIError(400, f"weight update refused, the old weights are still serving: {'; '.join(problems[:5])}",
                           param="update_info", code="invalid_weights")
        if self.staged is None:  # a concurrent init or failure ended this update meanwhile
            raise APIError(409, "the weight update was abandoned while receiving", code="update_abandoned")
        self.staged.update(received)
        self.receive_s += time.perf_counter() - t0
        return _json({"status": "ok", "received": len(received)})

    async def finish(self, request: web.Request) -> web.Response:
        body = await json_body(request)
        mode = body.get("mode") or "keep"
        if mode not in FINISH_MODES:
            raise APIError(400, f"mode must be one of {', '.join(FINISH_MODES)}; got {mode!r}", param="mode")
        if self.staged is None:
            raise APIError(409, "no weight update in progress", code="no_update_in_progress")
        if self._busy.locked():
            raise APIError(409, "update_weights is still receiving; finish after it returns",
                           code="transfer_in_progress")
        label = body.get("weight_version")
        if label is not None and (isinstance(label, bool) or not isinstance(label, int)
                                  or label <= self.engine.weight_version):
            raise APIError(400, f"weight_version must be an integer above the serving version "
                                f"{self.engine.weight_version}, got {label!r}", param="weight_version")
        staged, self.staged = self.staged, None
        if not staged:
            raise APIError(400, "no tensors were received since start_weight_update", code="nothing_received")
        self._finishing = True  # until the swap task ends (_swap clears it), even if the caller hangs up
        version, staged_s = await asyncio.shield(asyncio.ensure_future(self._swap(staged, mode, label)))
        return _json({"status": "ok", "weight_version": version, "receive_s": self.receive_s, "stage_s": staged_s,
                      "pause_s": self.engine.last_apply_s, "total_s": time.perf_counter() - self.started_at})

    async def _swap(self, staged: dict[str, Any], mode: str, label: int | None) -> tuple[int, float]:
        """Stage the received tensors (off the engine thread), then swap them in at a step
        boundary; (the new version, the staging time)."""
        try:
            return await self._stage_and_apply(staged, mode, label)
        finally:
            self._finishing = False

    async def _stage_and_apply(self, staged: dict[str, Any], mode: str, label: int | None) -> tuple[int, float]:
        from asyncengine.models.weights import WeightLoadError
        from asyncengine.rl.staging import stage, stage_views, swap_in

        t0 = time.perf_counter()
        core = self.engine.core
        model = core.model

        def build() -> Any:  # made of the spare buffers either way
            fast = stage_views(model, staged, self.spares)
            return fast if fast is not None else stage(model, staged, self.spares)

        try:
            shadow = await asyncio.to_thread(build)
        except WeightLoadError as exc:
            raise APIError(400, f"weight update refused, old weights still serving: {exc}",
                           code="invalid_weights") from exc
        staged_s = time.perf_counter() - t0

        def write() -> None:  # on the engine thread, at a step boundary
            swap_in(model, shadow)
            self.spares.flip()  # the buffers just written are served now; the previous ones are spare
            if label is not None:  # the trainer's label: apply_weights' +1 then lands on it
                core.weight_version = label - 1

        return await self.engine.apply_weights(write, mode), staged_s

    async def _receive(self, group: GlooGroup, update: UpdateInfo, flat: torch.Tensor,
                       rank: dict[str, int]) -> dict[str, Any]:
        async with self._busy:
            try:
                return await asyncio.to_thread(group.receive, update, flat, rank)
            except TransferError:
                self._fail(close=True)  # a broken group: the next init starts afresh
                raise

    def _fail(self, close: bool) -> None:
        self.staged = None
        if close:
            self._close_group()

    def _check_size(self, update: UpdateInfo) -> None:
        """Refuse announcements far larger than the model (a buffer is allocated per tensor)."""
        model_bytes = sum(t.numel() * 4 for t in self.engine.core.model.gemm_weights())
        declared = sum(math.prod(s) * torch.empty((), dtype=d).element_size()
                       for s, d in zip(update.shapes, update.dtypes))
        if declared > 4 * model_bytes + 2**20:
            raise TransferError(f"update_info announces {declared} bytes, over 4x the model's fp32 size",
                                param="update_info.shapes", code="transfer_too_large")

    def _shapes(self) -> dict[str, tuple[int, ...]]:
        from asyncengine.rl.staging import expected_shapes

        return expected_shapes(self.engine.core.model)

    @staticmethod
    def _parse(fn: Any, raw: Any) -> Any:
        try:
            return fn(raw)
        except TransferError as exc:
            raise _api_error(exc) from exc
