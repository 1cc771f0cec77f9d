"""Which replica serves a request: pure, synchronous routing state (no Ray, no HTTP).

Order of preference, as the RL frameworks' routers do it:
1. a session (`session_id` / `X-Session-ID`) stays on one replica, found by consistent
   hashing over the replicas in routing, so adding or losing one moves only its share;
2. a request whose prompt starts with full KV blocks already sent somewhere goes there
   (that replica has them in its prefix cache);
3. otherwise the least loaded replica (requests in flight through the front).
A pin (session or prefix) is dropped when its replica's load exceeds the least loaded
one's by more than `rebalance_margin`: the request goes to the least loaded replica and
the pin moves with it.
"""
from __future__ import annotations

import bisect
import hashlib
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

VIRTUAL_NODES = 64  # points per replica on the hash ring (spreads sessions evenly)


def _point(key: str) -> int:
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big")


def prefix_key(token_ids: Sequence[int], block_size: int, num_blocks: int) -> str | None:
    """A hash of the prompt's first `num_blocks` full KV blocks (fewer if the prompt is
    shorter); None when not even one block is full (nothing a cache could share)."""
    full = min(len(token_ids) // block_size, num_blocks)
    if full == 0:
        return None
    head = ",".join(map(str, token_ids[: full * block_size]))
    return hashlib.blake2b(head.encode(), digest_size=12).hexdigest()


class NoReplicaError(RuntimeError):
    """No replica is in routing (all down or failed)."""


@dataclass(slots=True)
class ReplicaState:
    """What the router knows of one replica."""

    # Requests in flight through the front.
    load: int = 0
    # In routing (False after a failure, until a replacement is ready).
    up: bool = True
    # Requests routed here, and those routed here because their prefix was sent here before.
    routed: int = 0
    prefix_routed: int = 0


@dataclass(slots=True)
class Router:
    """Routing over replicas 0..n-1; see the module docstring."""

    num_replicas: int
    rebalance_margin: int = 4
    # Most session and prefix pins remembered (least recently used dropped first).
    max_pins: int = 65536
    replicas: list[ReplicaState] = field(init=False)
    _ring: list[tuple[int, int]] = field(init=False, default_factory=list)
    _sessions: OrderedDict[str, int] = field(init=False, default_factory=OrderedDict)
    _prefixes: OrderedDict[str, int] = field(init=False, default_factory=OrderedDict)

    def __post_init__(self) -> None:
        if self.num_replicas < 1:
            raise ValueError("a router needs at least one replica")
        self.replicas = [ReplicaState() for _ in range(self.num_replicas)]
        self._rebuild_ring()

    # -- membership ---------------------------------------------------------------
    def mark_down(self, index: int) -> None:
        """Take a replica out of routing; its pins move on their next request."""
        self.replicas[index].up = False
        self._rebuild_ring()

    def mark_up(self, index: int) -> None:
        self.replicas[index].up = True
        self._rebuild_ring()

    def up_replicas(self) -> list[int]:
        return [i for i, r in enumerate(self.replicas) if r.up]

    def _rebuild_ring(self) -> None:
        self._ring = sorted((_point(f"{i}#{v}"), i) for i in self.up_replicas() for v in range(VIRTUAL_NODES))

    # -- routing ------------------------------------------------------------------
    def choose(self, session_id: str | None = None, prefix: str | None = None,
               exclude: frozenset[int] = frozenset()) -> int:
        """The replica for one request (not counted as in flight: call start())."""
        candidates = [i for i in self.up_replicas() if i not in exclude]
        if not candidates:
            raise NoReplicaError("no replica is available")
        least = min(candidates, key=lambda i: (self.replicas[i].load, i))
        if session_id is not None:
            owner = self._ring_owner(session_id, candidates)
            return self._pinned(self._sessions, session_id, owner, least, candidates)
        if prefix is not None:
            known = self._prefixes.get(prefix)
            chosen = self._pinned(self._prefixes, prefix, least, least, candidates)
            if chosen == known:
                self.replicas[chosen].prefix_routed += 1
            return chosen
        return least

    def start(self, index: int) -> None:
        self.replicas[index].load += 1
        self.replicas[index].routed += 1

    def finish(self, index: int) -> None:
        self.replicas[index].load = max(0, self.replicas[index].load - 1)

    def _pinned(self, pins: OrderedDict[str, int], key: str, default: int, least: int,
                candidates: list[int]) -> int:
        """The replica pinned for key (`default` when none is, or the pinned one is not a
        candidate), moved to `least` when it is overloaded by more than the margin."""
        pinned = pins.get(key)
        if pinned not in candidates:
            pinned = default
        if self.replicas[pinned].load > self.replicas[least].load + self.rebalance_margin:
            pinned = least
        pins[key] = pinned
        pins.move_to_end(key)
        while len(pins) > self.max_pins:
            pins.popitem(last=False)
        return pinned

    def _ring_owner(self, key: str, candidates: list[int]) -> int:
        """The first ring point at or after the key's hash owned by a candidate."""
        allowed = set(candidates)
        if not self._ring:
            return candidates[0]
        start = bisect.bisect_left(self._ring, (_point(key), -1))
        for k in range(len(self._ring)):
            owner = self._ring[(start + k) % len(self._ring)][1]
            if owner in allowed:
                return owner
        return candidates[0]
