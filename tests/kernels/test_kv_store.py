"""KV store: the Triton kernel writes exactly the bits the torch reference writes (a copy
has no tolerance), from strided views, touching no other slot; batch invariance."""
from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

import pytest
import torch

from kernels.kv_store import store_kv_torch, store_kv_triton


def _case(
    tokens: int, num_kv_heads: int, head_dim: int, block_size: int, seed: int
) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)
    num_blocks = 6
    k_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, generator=gen)
    v_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, generator=gen)
    kv = torch.randn(tokens, 2 * num_kv_heads, head_dim, generator=gen)  # k and v interleaved: strided views
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:tokens]
    return kv[:, :num_kv_heads], kv[:, num_kv_heads:], k_cache, v_cache, slots


def test_torch_reference_writes_each_slot() -> None:
    key, value, k_cache, v_cache, slots = _case(9, 3, 64, 16, seed=0)
    before_k = k_cache.clone()
    store_kv_torch(key, value, k_cache, v_cache, slots)
    for t, slot in enumerate(slots.tolist()):
        assert torch.equal(k_cache[slot // 16, slot % 16], key[t])
        assert torch.equal(v_cache[slot // 16, slot % 16], value[t])
    untouched = torch.ones(k_cache.shape[:2], dtype=torch.bool).view(-1)
    untouched[slots] = False
    assert torch.equal(k_cache.view(-1, 3, 64)[untouched], before_k.view(-1, 3, 64)[untouched])


@pytest.mark.usefixtures("need_triton")
@pytest.mark.parametrize(
    "tokens,num_kv_heads,head_dim,block_size", [(1, 1, 32, 16), (13, 3, 64, 16), (7, 4, 80, 8)]
)
def test_triton_writes_same_bits_as_torch(
    tokens: int, num_kv_heads: int, head_dim: int, block_size: int
) -> None:
    key, value, k_cache, v_cache, slots = _case(tokens, num_kv_heads, head_dim, block_size, seed=tokens)
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    store_kv_torch(key, value, k_ref, v_ref, slots)
    store_kv_triton(key, value, k_cache, v_cache, slots)
    assert torch.equal(k_cache, k_ref) and torch.equal(v_cache, v_ref)


@pytest.mark.usefixtures("need_triton")
def test_triton_rejects_non_contiguous_cache() -> None:
    key, value, k_cache, v_cache, slots = _case(3, 2, 32, 16, seed=1)
    with pytest.raises(ValueError, match="contiguous"):
        store_kv_triton(key, value, k_cache.transpose(0, 1), v_cache.transpose(0, 1), slots)


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_batch_invariance(impl: str, request: pytest.FixtureRequest) -> None:
    if impl == "triton":
        request.getfixturevalue("need_triton")
    fn = store_kv_torch if impl == "torch" else store_kv_triton
    key, value, k_cache, v_cache, slots = _case(8, 3, 64, 16, seed=2)
    k_one, v_one = k_cache.clone(), v_cache.clone()
    fn(key, value, k_cache, v_cache, slots)
    for t in range(8):  # the same tokens one launch each
        fn(key[t : t + 1], value[t : t + 1], k_one, v_one, slots[t : t + 1])
    assert torch.equal(k_one, k_cache) and torch.equal(v_one, v_cache)
