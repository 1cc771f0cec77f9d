"""Live sessions' cached blocks are evicted last, within a cap of the pool: exact orders."""
from __future__ import annotations

from pathlib import Path

import pytest

from asyncengine.block_pool import BlockPool
from asyncengine.kv_cache_manager import KVCacheManager
from asyncengine.request import Request
from asyncengine.sampling_params import SamplingParams
from asyncengine.sessions import SessionEngine
from tests.test_server import make_engine


def _cached_pool(n: int, cap: int) -> tuple[BlockPool, list]:
    pool = BlockPool(n, protected_cap=cap)
    blocks = pool.allocate(n)
    for i, b in enumerate(blocks):
        pool.cache(b, bytes([i]))
    return pool, blocks


def _order(pool: BlockPool) -> list[int]:
    return [b.block_id for b in pool.allocate(pool.num_free_blocks)]


def test_pinned_free_blocks_are_evicted_after_all_others() -> None:
    pool, blocks = _cached_pool(6, cap=6)
    pool.pin(blocks[0])
    pool.pin(blocks[3])
    pool.free(blocks)  # in id order: 0..5, pinned ones to the protected queue
    assert pool.num_free_blocks == 6 and pool.num_protected_blocks == 2
    assert _order(pool) == [1, 2, 4, 5, 0, 3]
    assert all(b.pins == 0 for b in blocks) and pool.num_evictions == 6


def test_pinning_a_free_block_moves_it_behind_the_others() -> None:
    pool, blocks = _cached_pool(4, cap=4)
    pool.free(blocks)
    pool.pin(blocks[1])
    assert pool.num_protected_blocks == 1
    assert _order(pool) == [0, 2, 3, 1]


def test_cap_drops_the_oldest_pinned_block_to_the_ordinary_queue() -> None:
    pool, blocks = _cached_pool(5, cap=2)
    for b in blocks[:3]:
        pool.pin(b)
    # Freed in id order: when 2 arrives the cap drops 0 to the back of the ordinary queue
    # (empty then), before 3 and 4 are freed behind it.
    pool.free(blocks)
    assert pool.num_protected_blocks == 2
    assert _order(pool) == [0, 3, 4, 1, 2]


def test_unpin_sends_a_block_to_the_front_and_a_zero_cap_changes_nothing() -> None:
    pool, blocks = _cached_pool(4, cap=4)
    pool.pin(blocks[2])
    pool.free(blocks)
    pool.unpin(blocks[2])
    assert pool.num_protected_blocks == 0
    assert _order(pool) == [2, 0, 1, 3]
    pool, blocks = _cached_pool(3, cap=0)
    pool.free(blocks)
    pool.pin(blocks[0])
    assert _order(pool) == [0, 1, 2]


def test_touch_takes_a_pinned_block_out_and_reset_clears_pins() -> None:
    pool, blocks = _cached_pool(3, cap=3)
    pool.pin(blocks[0])
    pool.free(blocks)
    pool.touch([blocks[0]])
    assert pool.num_free_blocks == 2 and pool.num_protected_blocks == 0
    pool.free([blocks[0]])
    assert pool.num_protected_blocks == 1
    pool.reset_prefix_cache()
    assert pool.num_protected_blocks == 0 and blocks[0].pins == 0 and pool.num_free_blocks == 3


def _req(rid: str, tokens: list[int]) -> Request:
    return Request(rid, tokens, SamplingParams(max_tokens=1), seed=0)


def _run(kv: KVCacheManager, r: Request) -> None:
    """Admit with prefix hits, compute every token, register its full blocks."""
    hits = kv.get_computed_blocks(r, 0)
    assert kv.allocate_slots(r, r.num_tokens - len(hits) * kv.block_size, hits)
    r.num_computed_tokens = r.num_tokens
    kv.cache_full_blocks(r, 0)


def test_manager_pins_a_sessions_request_blocks_and_moves_them_per_turn() -> None:
    pool = BlockPool(8, protected_cap=8)
    kv = KVCacheManager(pool, block_size=2)
    turn1 = _req("t1", [1, 2, 3, 4, 5])  # blocks: [1,2] [3,4] full, [5] partial
    kv.pin_request("t1", "sess")
    _run(kv, turn1)
    first = [pool.blocks[i] for i in kv.block_ids("t1")[:2]]
    kv.free(turn1)
    assert pool.num_protected_blocks == 2  # the two full (cached) blocks, not the partial one
    other = _req("o", [9, 9, 9, 9])
    _run(kv, other)
    kv.free(other)
    turn2 = _req("t2", [1, 2, 3, 4, 5, 6, 7])
    kv.pin_request("t2", "sess")
    _run(kv, turn2)
    assert kv.block_ids("t2")[:2] == [b.block_id for b in first]  # turn 1's blocks were kept
    kv.free(turn2)
    assert pool.num_protected_blocks == 3 and [b.pins for b in first] == [1, 1]
    kv.unpin("sess")
    assert pool.num_protected_blocks == 0 and all(b.pins == 0 for b in pool.blocks)
    assert pool.num_free_blocks == 8


def test_a_stale_pin_never_unpins_a_reused_block() -> None:
    pool = BlockPool(2, protected_cap=2)
    kv = KVCacheManager(pool, block_size=2)
    r = _req("a", [1, 2, 3])
    kv.pin_request("a", "s1")
    _run(kv, r)
    kv.free(r)
    block = pool.blocks[0]
    assert block.pins == 1
    pool.allocate(2)  # evicts it (pins reset), then someone else pins the new data
    pool.cache(block, b"x")
    pool.pin(block)
    kv.unpin("s1")  # s1's record names the old generation: no effect
    assert block.pins == 1


@pytest.mark.parametrize("fraction", [0.5, 0.0])
async def test_a_live_session_keeps_its_cache_through_other_traffic(llama_dir: Path, fraction: float) -> None:
    """24 blocks: a session's history (5 full blocks + 1 partial), then two 200-token
    requests that each need 13. Protected, the history survives them; unprotected
    (fraction 0) plain LRU evicts it, since it was freed before the first request's blocks."""
    engine = make_engine(llama_dir, num_kv_blocks=24, block_size=16, session_kv_fraction=fraction)
    try:
        sessions = SessionEngine(engine)
        msgs = [{"role": "user", "content": "The quick brown fox jumps over the lazy dog. " * 3}]
        r1 = await sessions.chat("live", msgs, SamplingParams(max_tokens=4, seed=0, ignore_eos=True))
        history = r1.prompt_tokens + 4
        assert (history - 1) // 16 == 5 and history <= 6 * 16
        for start in (3, 103):
            async for _ in engine.generate([start + i % 97 for i in range(200)], SamplingParams(max_tokens=1)):
                pass
        r2 = await sessions.chat("live", [*msgs, r1.message, {"role": "user", "content": "ok"}],
                                 SamplingParams(max_tokens=1))
        assert r2.cached_tokens == (5 * 16 if fraction else 0)
        await sessions.delete("live")
    finally:
        engine.shutdown()
