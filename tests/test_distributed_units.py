"""Replica routing and weight packing without Ray: the router's rules exactly (session
stickiness by consistent hashing, prefix affinity, least loaded, re-pinning past the
margin, failures) and the object-store form of a state dict."""
from __future__ import annotations

import pytest
import torch

from asyncengine.distributed.replica import pack_state, unpack_state
from asyncengine.distributed.router import NoReplicaError, Router, prefix_key


def test_state_packing_round_trips_bf16_and_fp32() -> None:
    state = {"a": torch.randn(3, 5), "b": torch.randn(4).bfloat16(), "c": torch.arange(6).view(2, 3)}
    back = unpack_state(pack_state(state))
    assert all(back[k].dtype == v.dtype and torch.equal(back[k], v) for k, v in state.items())


def test_prefix_key_hashes_whole_blocks_only() -> None:
    assert prefix_key(list(range(15)), 16, 2) is None  # not one full block
    one = prefix_key(list(range(16)), 16, 2)
    assert one is not None and one == prefix_key(list(range(16)) + [99, 98], 16, 2)  # partial block ignored
    assert prefix_key(list(range(32)), 16, 2) == prefix_key(list(range(32)) + [7] * 40, 16, 2)  # capped at 2
    assert prefix_key(list(range(32)), 16, 2) != one
    assert prefix_key([1] + list(range(1, 16)), 16, 2) != one


def test_a_session_sticks_to_one_replica() -> None:
    r = Router(4)
    first = {f"s{i}": r.choose(session_id=f"s{i}") for i in range(200)}
    assert len(set(first.values())) == 4, "consistent hashing spreads sessions over every replica"
    for _ in range(3):
        for sid, idx in first.items():
            chosen = r.choose(session_id=sid)
            r.start(chosen)
            assert chosen == idx and r.choose(session_id=sid) == idx
            r.finish(chosen)


def test_losing_a_replica_moves_only_its_sessions() -> None:
    r = Router(4)
    before = {f"s{i}": r.choose(session_id=f"s{i}") for i in range(400)}
    r.mark_down(2)
    after = {sid: r.choose(session_id=sid) for sid in before}
    assert all(after[s] == before[s] for s in before if before[s] != 2)
    assert all(after[s] != 2 for s in before)
    # A fresh router without replica 2 on its ring places new sessions the same way.
    r.mark_up(2)
    assert {sid: r.choose(session_id=sid) for sid in before} == after, "pins outlive the ring change"


def test_prefix_goes_where_it_was_sent() -> None:
    r = Router(3)
    key = prefix_key(list(range(64)), 16, 2)
    first = r.choose(prefix=key)
    r.start(first)  # now it is the most loaded, within the margin
    assert r.choose(prefix=key) == first
    assert r.replicas[first].prefix_routed == 1
    other = r.choose(prefix=prefix_key(list(range(100, 164)), 16, 2))
    assert other != first, "a new prefix goes to the least loaded replica"


def test_least_loaded_without_keys() -> None:
    r = Router(3)
    picks = []
    for _ in range(6):
        i = r.choose()
        r.start(i)
        picks.append(i)
    assert picks == [0, 1, 2, 0, 1, 2]
    r.finish(1)
    assert r.choose() == 1


def test_pin_moves_when_its_replica_is_overloaded_by_more_than_the_margin() -> None:
    r = Router(2, rebalance_margin=2)
    home = r.choose(session_id="abc")
    other = 1 - home
    for _ in range(2):
        r.start(home)
    assert r.choose(session_id="abc") == home  # 2 > 0 + 2 is false: stays
    r.start(home)
    assert r.choose(session_id="abc") == other  # 3 > 0 + 2: moves
    r.replicas[home].load = 0
    assert r.choose(session_id="abc") == other, "the pin moved with it"


def test_excluded_and_down_replicas_are_never_chosen() -> None:
    r = Router(2)
    home = r.choose(session_id="x")
    assert r.choose(session_id="x", exclude=frozenset({home})) == 1 - home
    r.mark_down(0)
    r.mark_down(1)
    with pytest.raises(NoReplicaError):
        r.choose()


def test_pins_are_bounded() -> None:
    r = Router(2, max_pins=10)
    for i in range(50):
        r.choose(session_id=f"s{i}")
    assert len(r._sessions) == 10
