"""N engine replicas as Ray actors on one placement group, and the control plane over them.

Control calls fan out to every replica in routing. A weight update is two-phase, so the
versions stay in lockstep: pause all (keep) -> update all -> resume all; the tensors are
put in Ray's object store once and every replica reads that one copy. A replica that fails
its update leaves routing (it would serve old weights) and is replaced; a replacement
takes the group's current weights and version before it is routed anything.
"""
from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from asyncengine.config import EngineConfig
from asyncengine.distributed.replica import EngineReplica, pack_state

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class GroupOptions:
    num_replicas: int = 2
    # Ray resources reserved per replica (one placement-group bundle each).
    num_cpus_per_replica: float = 1.0
    num_gpus_per_replica: float = 0.0
    # PACK (one node when it fits) or SPREAD (one replica per node).
    strategy: str = "PACK"
    # Seconds a replica may take to load its model and start serving.
    start_timeout_s: float = 300.0

    def __post_init__(self) -> None:
        if self.num_replicas < 1:
            raise ValueError("num_replicas must be at least 1")
        if self.num_cpus_per_replica <= 0 or self.num_gpus_per_replica < 0:
            raise ValueError("per-replica CPUs must be positive and GPUs non-negative")
        if self.strategy not in ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"):
            raise ValueError(f"unknown placement strategy {self.strategy!r}")


class ReplicaFailedError(RuntimeError):
    """A replica did not answer a control call (it left routing)."""


@dataclass(slots=True)
class Replica:
    index: int
    actor: Any
    url: str
    # Replicas that failed are out of the group until replaced.
    up: bool = True


@dataclass(slots=True)
class ReplicaGroup:
    """Start with `await ReplicaGroup.start(config, options)` (Ray must be initialized)."""

    config: EngineConfig
    options: GroupOptions
    served_model_names: list[str] | None = None
    # api.server.create_app's keyword options for every replica's app.
    app_options: dict[str, Any] = field(default_factory=dict)
    replicas: list[Replica] = field(default_factory=list)
    weight_version: int = 0
    # Called with a replica's index when it leaves (failure) and when it (re)joins.
    on_down: Callable[[int], None] | None = None
    on_up: Callable[[int], None] | None = None
    # Each replica's admin endpoints take this key (the front's weight-transfer fan-out).
    admin_key: str = field(default_factory=lambda: secrets.token_hex(16))
    _pg: Any = None
    _weights_ref: Any = None  # the latest update's tensors in the object store (None: initial)
    # The weights came over a transfer group, not the object store: a replacement copies
    # them from a live replica.
    _weights_elsewhere: bool = False
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    @classmethod
    async def start(cls, config: EngineConfig, options: GroupOptions, served_model_names: list[str] | None = None,
                    app_options: dict[str, Any] | None = None) -> ReplicaGroup:
        from ray.util.placement_group import placement_group

        group = cls(config, options, served_model_names, dict(app_options or {}))
        bundle = {"CPU": options.num_cpus_per_replica}
        if options.num_gpus_per_replica:
            bundle["GPU"] = options.num_gpus_per_replica
        group._pg = placement_group([dict(bundle) for _ in range(options.num_replicas)], strategy=options.strategy)
        await asyncio.wait_for(group._pg.ready(), options.start_timeout_s)
        group.replicas = list(await asyncio.gather(*(group._spawn(i) for i in range(options.num_replicas))))
        return group

    async def _spawn(self, index: int) -> Replica:
        import ray
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        strategy = PlacementGroupSchedulingStrategy(self._pg, placement_group_bundle_index=index)
        actor = ray.remote(EngineReplica).options(
            num_cpus=self.options.num_cpus_per_replica, num_gpus=self.options.num_gpus_per_replica,
            scheduling_strategy=strategy, max_restarts=0, max_concurrency=1000,
        ).remote(self.config, self.served_model_names, self.app_options, admin_key=self.admin_key)
        url = await asyncio.wait_for(actor.start.remote(), self.options.start_timeout_s)
        return Replica(index, actor, url)

    def up_replicas(self) -> list[Replica]:
        return [r for r in self.replicas if r.up]

    # -- control plane ------------------------------------------------------------
    async def call_all(self, method: str, *args: Any) -> list[Any]:
        """Call a method on every replica in the group; a replica that fails leaves it."""
        live = self.up_replicas()
        results = await asyncio.gather(*(getattr(r.actor, method).remote(*args) for r in live),
                                       return_exceptions=True)
        for r, res in zip(live, results):
            if isinstance(res, BaseException):
                self.mark_failed(r.index, f"{method} failed: {res!r}")
        return [res for res in results if not isinstance(res, BaseException)]

    async def pause(self, mode: str = "keep") -> None:
        await self.call_all("pause", mode)

    async def resume(self) -> None:
        await self.call_all("resume")

    async def reset_prefix_cache(self) -> None:
        await self.call_all("reset_prefix_cache")

    async def update_weights(self, state: Mapping[str, Any], mode: str = "keep") -> int:
        """Two-phase update of every replica; returns the group's new version.

        If every replica refuses the weights (bad names or shapes), the first error is
        raised and nothing changed anywhere (loads validate before writing)."""
        import ray

        async with self.lock:
            ref = ray.put(pack_state(state))
            live = self.up_replicas()
            await self.pause("keep")
            try:
                results = await asyncio.gather(*(r.actor.update_weights.remote(ref, mode) for r in live),
                                               return_exceptions=True)
            finally:
                await self.resume()
            errors = [res for res in results if isinstance(res, BaseException)]
            if len(errors) == len(live):
                raise _cause(errors[0])
            self.weight_version += 1
            self._weights_ref, self._weights_elsewhere = ref, False
            for r, res in zip(live, results):
                if isinstance(res, BaseException) or res != self.weight_version:
                    self.mark_failed(r.index, f"update_weights gave {res!r}")
            return self.weight_version

    def transferred(self, version: int) -> None:
        """Weights arrived over a transfer group (the front's fan-out, under `lock`):
        record the version the replicas now serve."""
        self.weight_version = version
        self._weights_ref, self._weights_elsewhere = None, True

    # -- membership ---------------------------------------------------------------
    def mark_failed(self, index: int, reason: str) -> None:
        replica = self.replicas[index]
        if replica.up:
            log.warning("replica %d leaves routing: %s", index, reason)
            replica.up = False
            if self.on_down is not None:
                self.on_down(index)

    async def replace(self, index: int) -> Replica:
        """Kill replica `index` (if alive) and start a new one in its bundle, at the
        group's weights and version; it joins routing when ready."""
        import ray

        old = self.replicas[index]
        self.mark_failed(index, "being replaced")
        try:
            ray.kill(old.actor, no_restart=True)
        except Exception:  # already dead
            pass
        new = await self._spawn(index)
        async with self.lock:  # no update may land between the sync and joining
            ref = self._weights_ref
            if self._weights_elsewhere:
                donors = self.up_replicas()
                if not donors:
                    await _quiet(new.actor.stop.remote())
                    raise ReplicaFailedError("no live replica holds the current weights to copy")
                ref = donors[0].actor.export_weights.remote()
            await new.actor.sync_weights.remote(ref, self.weight_version)
            self.replicas[index] = new
        if self.on_up is not None:
            self.on_up(index)
        return new

    async def shutdown(self) -> None:
        import ray
        from ray.util.placement_group import remove_placement_group

        await asyncio.gather(*(_quiet(r.actor.stop.remote()) for r in self.up_replicas()))
        for r in self.replicas:
            try:
                ray.kill(r.actor, no_restart=True)
            except Exception:
                pass
        if self._pg is not None:
            remove_placement_group(self._pg)


def _cause(exc: BaseException) -> BaseException:
    """The replica's own exception inside a Ray task error, when Ray kept it."""
    inner = getattr(exc, "cause", None)
    return inner if isinstance(inner, BaseException) else exc


async def _quiet(aw: Awaitable[Any]) -> None:
    try:
        await aw
    except Exception:
        pass
