"""Block pool and KV cache manager: exact block ids, ref counts, eviction order, hashing."""
from __future__ import annotations

import pytest

from asyncengine.block_pool import BlockPool, NoFreeBlocksError
from asyncengine.kv_cache_manager import KVCacheManager, hash_block
from asyncengine.request import Request
from asyncengine.sampling_params import SamplingParams


def req(rid: str, tokens: list[int], **kw: object) -> Request:
    return Request(rid, tokens, SamplingParams(max_tokens=4, **kw), seed=0)


def test_pool_allocates_in_order_and_frees_to_lru_tail() -> None:
    pool = BlockPool(6)
    a = pool.allocate(3)
    assert [b.block_id for b in a] == [0, 1, 2]
    assert pool.num_free_blocks == 3
    pool.free(list(reversed(a)))
    # Freed blocks join the back of the queue in the order given (tail first).
    assert [b.block_id for b in pool.allocate(6)] == [3, 4, 5, 2, 1, 0]
    with pytest.raises(NoFreeBlocksError):
        pool.allocate(1)


def test_pool_double_free_is_caught() -> None:
    pool = BlockPool(2)
    blocks = pool.allocate(1)
    pool.free(blocks)
    with pytest.raises(AssertionError):
        pool.free(blocks)


def test_eviction_only_of_unreferenced_cached_blocks() -> None:
    pool = BlockPool(3)
    blocks = pool.allocate(3)
    for i, b in enumerate(blocks):
        pool.cache(b, bytes([i]))
    pool.free([blocks[0]])
    assert pool.lookup(bytes([0])) is blocks[0]  # free but still cached
    [again] = pool.allocate(1)  # takes block 0 and evicts its hash
    assert again is blocks[0] and pool.lookup(bytes([0])) is None
    assert pool.lookup(bytes([1])) is blocks[1] and pool.num_evictions == 1


def test_hash_chain_depends_on_parent_salt_and_tokens() -> None:
    h = hash_block(None, 0, [1, 2])
    assert h == hash_block(None, 0, [1, 2])
    assert h != hash_block(None, 1, [1, 2])  # weight version salt
    assert h != hash_block(None, 0, [2, 1])
    assert hash_block(h, 0, [3, 4]) != hash_block(None, 0, [3, 4])


def test_prefix_hits_share_blocks_and_leave_one_token_to_compute() -> None:
    pool = BlockPool(16)
    kv = KVCacheManager(pool, block_size=4)
    a = req("a", list(range(12)))
    assert kv.get_computed_blocks(a, salt=0) == []
    assert kv.allocate_slots(a, 12)
    a.num_computed_tokens = 12
    kv.cache_full_blocks(a, salt=0)
    assert kv.block_ids("a") == [0, 1, 2]

    b = req("b", list(range(12)))  # identical prompt: 2 full blocks hit, last block recomputed
    hits = kv.get_computed_blocks(b, salt=0)
    assert [h.block_id for h in hits] == [0, 1]
    assert kv.allocate_slots(b, 4, hits)
    assert kv.block_ids("b") == [0, 1, 3]
    assert pool.blocks[0].ref_cnt == 2
    assert kv.get_computed_blocks(req("c", list(range(12))), salt=1) == []  # other weights: no hit

    kv.free(a)
    kv.free(b)
    assert pool.num_free_blocks == 16
    kv.reset_prefix_cache()
    assert kv.get_computed_blocks(req("d", list(range(12))), salt=0) == []


def test_allocate_fails_without_side_effects() -> None:
    pool = BlockPool(4)
    kv = KVCacheManager(pool, block_size=4)
    r = req("a", list(range(20)))
    assert not kv.allocate_slots(r, 20)  # needs 5 blocks, pool has 4
    assert pool.num_free_blocks == 4 and kv.block_ids("a") == []
    assert kv.allocate_slots(r, 16)
    assert pool.num_free_blocks == 0
    kv.free(r)
    assert pool.num_free_blocks == 4


def test_prompt_logprob_requests_skip_the_prefix_cache() -> None:
    pool = BlockPool(8)
    kv = KVCacheManager(pool, block_size=4)
    a = req("a", list(range(9)))
    assert kv.allocate_slots(a, 9)
    a.num_computed_tokens = 9
    kv.cache_full_blocks(a, salt=0)
    assert len(kv.get_computed_blocks(req("b", list(range(9))), salt=0)) == 2
    assert kv.get_computed_blocks(req("c", list(range(9)), prompt_logprobs=0), salt=0) == []


def test_blocks_of_a_request_finished_in_its_prefill_step_are_cached(llama_dir) -> None:
    from asyncengine.config import EngineConfig
    from asyncengine.engine_core import EngineCore

    core = EngineCore(EngineConfig(model=str(llama_dir), num_kv_blocks=16, block_size=4))
    core.add_request("a", list(range(3, 14)), SamplingParams(max_tokens=1))
    while core.has_unfinished():
        core.step()
    core.add_request("b", list(range(3, 14)), SamplingParams(max_tokens=1))
    [out] = core.step()
    assert out.num_cached_tokens == 8  # two full blocks of 4; the last token is recomputed
