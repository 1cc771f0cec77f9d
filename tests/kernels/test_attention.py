"""Paged attention over block tables for mixed batches (prefill chunks + decodes).

- the torch reference against a dense float64 causal softmax(QK^T)V per sequence, with
  K/V gathered from the block table (rtol = atol = 1e-5);
- the Triton kernel (interpreter) against the torch reference: odd lengths, partial
  blocks, chunk starts inside a block, key tiles spanning several blocks, GQA ratios
  1/2/3/4, head dims 32/64/80 (rtol = atol = 1e-5, fp32);
- the compiled CPU op (kernels/attention_cpu.py) against the torch reference, in both
  cache layouts (its own d-major keys and the plain one) with the same bits, fp32 and
  bf16 caches, block sizes 8/16/32; prompt rows in its own layout, bitwise whatever the
  chunking (its pairs of key chunks and of tokens form at other rows);
- invariance, bitwise: a sequence alone vs in a batch, and a query's output whatever
  chunk of chunked prefill it is computed in (the Triton kernel's query blocks are
  aligned to absolute positions, so this holds for any BLAS under the interpreter, e.g.
  OPENBLAS_CORETYPE=Haswell, and on a GPU).
"""
from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

from typing import TYPE_CHECKING, Callable

import pytest
import torch

from kernels.attention import AttentionMetadata, paged_attention_torch, paged_attention_triton
from kernels.attention_cpu import new_kv_cache, paged_attention_cpu, store_kv_cpu

if TYPE_CHECKING:  # the builder lives in this folder's conftest.py (fixture paged_case)
    from conftest import PagedCase

TOL = {"rtol": 1e-5, "atol": 1e-5}
# (sequence, seq_len, q_len): decodes at odd lengths and exactly at block/tile ends, a chunk
# that starts mid-block, a fresh prefill, and a long chunk crossing key tiles.
MIXED = [(0, 37, 1), (1, 64, 1), (2, 70, 13), (3, 5, 5), (4, 130, 40), (5, 17, 1), (6, 65, 1)]
MAX_LENS = [37, 64, 70, 5, 130, 17, 65]


def _impl(name: str, request: pytest.FixtureRequest) -> Callable[..., torch.Tensor]:
    if name == "triton":
        request.getfixturevalue("need_triton")
        return paged_attention_triton
    if name == "cpu":
        return paged_attention_cpu
    return paged_attention_torch


def _dense(
    q: torch.Tensor, case: PagedCase, meta: AttentionMetadata, items: list[tuple[int, int, int]], scale: float
) -> torch.Tensor:
    """Plain causal attention in float64 per sequence, K/V gathered slot by slot."""
    block_size, num_kv_heads = case.k_cache.shape[1], case.k_cache.shape[2]
    group = q.shape[1] // num_kv_heads
    out = torch.empty(q.shape, dtype=torch.float64)
    for s, (seq, seq_len, q_len) in enumerate(items):
        table = case.tables[seq]
        slots = [table[p // block_size] * block_size + p % block_size for p in range(seq_len)]
        k = case.k_cache.view(-1, num_kv_heads, q.shape[2])[slots].double().repeat_interleave(group, 1)
        v = case.v_cache.view(-1, num_kv_heads, q.shape[2])[slots].double().repeat_interleave(group, 1)
        start = meta.query_start_loc_list[s]
        qs = q[start : start + q_len].double()  # [q_len, Hq, D]
        scores = torch.einsum("qhd,khd->hqk", qs, k) * scale
        q_pos = torch.arange(seq_len - q_len, seq_len)[:, None]
        scores.masked_fill_(torch.arange(seq_len)[None, :] > q_pos, float("-inf"))
        out[start : start + q_len] = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v)
    return out


def test_torch_reference_matches_dense_attention(paged_case: Callable) -> None:
    case = paged_case(MAX_LENS, 8, 2, 32, 16, seed=0)
    q, meta = case.batch(MIXED)
    out = paged_attention_torch(q, case.k_cache, case.v_cache, meta, 0.3)
    torch.testing.assert_close(out.double(), _dense(q, case, meta, MIXED, 0.3), **TOL)


@pytest.mark.usefixtures("need_triton")
@pytest.mark.parametrize(
    "num_heads,num_kv_heads,head_dim,block_size",
    [(4, 4, 32, 16), (8, 4, 64, 16), (8, 2, 32, 8), (9, 3, 64, 16), (4, 2, 80, 32)],
)
def test_triton_matches_torch(
    paged_case: Callable, num_heads: int, num_kv_heads: int, head_dim: int, block_size: int
) -> None:
    case = paged_case(MAX_LENS, num_heads, num_kv_heads, head_dim, block_size, seed=head_dim + num_heads)
    q, meta = case.batch(MIXED)
    scale = head_dim**-0.5
    ref = paged_attention_torch(q, case.k_cache, case.v_cache, meta, scale)
    torch.testing.assert_close(paged_attention_triton(q, case.k_cache, case.v_cache, meta, scale), ref, **TOL)


@pytest.mark.usefixtures("need_triton")
def test_triton_accepts_strided_queries(paged_case: Callable) -> None:
    case = paged_case([20, 9], 4, 2, 32, 16, seed=3)
    q, meta = case.batch([(0, 20, 3), (1, 9, 1)])
    wide = torch.cat([q, q], dim=1)[:, :4]  # [T, Hq, D] view with a token stride of 2 * Hq * D
    ref = paged_attention_torch(q, case.k_cache, case.v_cache, meta, 0.2)
    out = paged_attention_triton(wide, case.k_cache, case.v_cache, meta, 0.2)
    torch.testing.assert_close(out, ref, **TOL)


@pytest.mark.parametrize("impl", ["torch", "cpu", "triton"])
def test_sequence_alone_equals_sequence_in_batch(
    impl: str, paged_case: Callable, request: pytest.FixtureRequest
) -> None:
    attend = _impl(impl, request)
    case = paged_case(MAX_LENS, 9, 3, 64, 16, seed=7)
    q, meta = case.batch(MIXED)
    batch = attend(q, case.k_cache, case.v_cache, meta, 0.125)
    for s, item in enumerate(MIXED):
        q_one, meta_one = case.batch([item])
        alone = attend(q_one, case.k_cache, case.v_cache, meta_one, 0.125)
        start, end = meta.query_start_loc_list[s], meta.query_start_loc_list[s + 1]
        assert torch.equal(alone, batch[start:end]), f"sequence {s} changed inside the batch"


@pytest.mark.parametrize("impl", ["torch", "cpu", "triton"])
def test_output_independent_of_prefill_chunking(
    impl: str, paged_case: Callable, request: pytest.FixtureRequest
) -> None:
    attend = _impl(impl, request)
    case = paged_case([75], 8, 2, 32, 16, seed=11)
    q, meta = case.batch([(0, 75, 75)])
    whole = attend(q, case.k_cache, case.v_cache, meta, 0.2)  # [75, Hq, D]
    # Chunks ending mid-block, mid-tile, one-token decodes after a prefill.
    for chunks in ([29, 46], [7, 50, 18], [64, 10, 1]):
        done = 0
        for size in chunks:
            q_c, meta_c = case.batch([(0, done + size, size)])
            got = attend(q_c, case.k_cache, case.v_cache, meta_c, 0.2)
            assert torch.equal(got, whole[done : done + size]), f"chunks {chunks}: rows {done}..{done + size}"
            done += size


@pytest.mark.usefixtures("need_triton")
@pytest.mark.parametrize("num_heads,num_kv_heads", [(4, 4), (9, 3), (4, 1)])
def test_triton_chunking_invariance_at_every_tile_offset(
    paged_case: Callable, num_heads: int, num_kv_heads: int
) -> None:
    """Query blocks are aligned to absolute positions, so a row meets the same tile
    geometry whether its chunk starts at 0 or at any offset inside a query block
    (BLOCK_Q is 8 to 32 here): checked bitwise for chunks starting at 1..9, inside a
    batch with a decode that shifts every flattened row index."""
    case = paged_case([41, 12], num_heads, num_kv_heads, 32, 16, seed=num_heads)
    q, meta = case.batch([(0, 41, 41)])
    whole = paged_attention_triton(q, case.k_cache, case.v_cache, meta, 0.2)  # [41, Hq, D]
    for start in range(1, 10):
        q_c, meta_c = case.batch([(1, 12, 1), (0, 41, 41 - start)])
        got = paged_attention_triton(q_c, case.k_cache, case.v_cache, meta_c, 0.2)
        assert torch.equal(got[1:], whole[start:]), f"chunk starting at {start}"


@pytest.mark.parametrize("impl", ["torch", "cpu", "triton"])
@pytest.mark.parametrize("stale", [float("nan"), float("inf")])
def test_stale_slots_never_leak(
    impl: str, stale: float, paged_case: Callable, request: pytest.FixtureRequest
) -> None:
    """A reused block keeps an earlier user's values past a sequence's end: even a
    non-finite one must not change the output (0 * inf would be NaN)."""
    attend = _impl(impl, request)
    case = paged_case([21, 9], 4, 2, 32, 16, seed=5)
    q, meta = case.batch([(0, 21, 4), (1, 9, 1)])
    ref = attend(q, case.k_cache, case.v_cache, meta, 0.2)
    used = torch.zeros(case.k_cache.shape[:2], dtype=torch.bool)
    for seq, seq_len in ((0, 21), (1, 9)):
        for p in range(seq_len):
            used[case.tables[seq][p // 16], p % 16] = True
    case.k_cache[~used] = stale
    case.v_cache[~used] = stale
    v_before = case.v_cache.clone()
    assert torch.equal(attend(q, case.k_cache, case.v_cache, meta, 0.2), ref)
    assert torch.equal(case.v_cache.nan_to_num(), v_before.nan_to_num()), "the cache was modified"


def _relaid(case: PagedCase, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """The case's caches copied into the CPU op's own layout (keys d-major per block)."""
    num_blocks, block_size, num_kv_heads, head_dim = case.k_cache.shape
    k, v = new_kv_cache(num_blocks, block_size, num_kv_heads, head_dim, dtype)
    k.copy_(case.k_cache)
    v.copy_(case.v_cache)
    return k, v


@pytest.mark.parametrize(
    "num_heads,num_kv_heads,head_dim,block_size",
    [(4, 4, 32, 16), (8, 4, 64, 16), (8, 2, 32, 8), (9, 3, 64, 16), (4, 2, 80, 32), (6, 1, 128, 16)],
)
def test_cpu_op_matches_torch_in_both_layouts(
    paged_case: Callable, num_heads: int, num_kv_heads: int, head_dim: int, block_size: int
) -> None:
    case = paged_case(MAX_LENS, num_heads, num_kv_heads, head_dim, block_size, seed=head_dim + block_size)
    q, meta = case.batch(MIXED)
    scale = head_dim**-0.5
    ref = paged_attention_torch(q, case.k_cache, case.v_cache, meta, scale)
    plain = paged_attention_cpu(q, case.k_cache, case.v_cache, meta, scale)
    torch.testing.assert_close(plain, ref, **TOL)
    # The d-major key layout is read in place, the plain one through a transposed copy:
    # the same operations on the same values, so the same bits.
    assert torch.equal(paged_attention_cpu(q, *_relaid(case), meta, scale), plain)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("num_heads,num_kv_heads,head_dim", [(9, 3, 64), (8, 4, 64), (4, 4, 64), (6, 1, 128)])
def test_cpu_op_prefill_rows_in_own_layout_independent_of_chunking(
    paged_case: Callable, dtype: torch.dtype, num_heads: int, num_kv_heads: int, head_dim: int
) -> None:
    """Prefill rows on the CPU op's own layout take keys two chunks at a time and values two
    tokens at a time where they fit (kernels/csrc/paged_pairs.h); which rows pair up
    depends on where the chunk starts. Bitwise: every chunking gives the whole prompt's
    rows, which equal the plain layout's (keys one chunk at a time); close to torch."""
    case = paged_case([75], num_heads, num_kv_heads, head_dim, 16, seed=num_heads * head_dim)
    q, meta = case.batch([(0, 75, 75)])
    scale = head_dim**-0.5
    k, v = _relaid(case, dtype)
    whole = paged_attention_cpu(q, k, v, meta, scale)
    plain = paged_attention_cpu(q, case.k_cache.to(dtype), case.v_cache.to(dtype), meta, scale)
    assert torch.equal(whole, plain)
    ref = paged_attention_torch(q, case.k_cache.to(dtype).float(), case.v_cache.to(dtype).float(), meta, scale)
    torch.testing.assert_close(whole, ref, **TOL)
    for chunks in ([29, 46], [7, 50, 18], [33, 2, 40], [64, 10, 1]):
        done = 0
        for size in chunks:
            q_c, meta_c = case.batch([(0, done + size, size)])
            got = paged_attention_cpu(q_c, k, v, meta_c, scale)
            assert torch.equal(got, whole[done : done + size]), f"chunks {chunks}: rows {done}..{done + size}"
            done += size


def test_cpu_op_with_bf16_cache_matches_torch(paged_case: Callable) -> None:
    case = paged_case(MAX_LENS, 9, 3, 64, 16, seed=2)
    q, meta = case.batch(MIXED)
    k, v = _relaid(case, torch.bfloat16)
    ref = paged_attention_torch(q.bfloat16(), k, v, meta, 0.125).float()
    out = paged_attention_cpu(q.bfloat16(), k, v, meta, 0.125)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, rtol=2e-2, atol=2e-2)


def test_cpu_store_kv_writes_the_slots_its_attention_reads(paged_case: Callable) -> None:
    """store_kv_cpu into the op's own layout, then attention, equals the plain cache."""
    case = paged_case([40, 23], 4, 2, 32, 16, seed=4)
    q, meta = case.batch([(0, 40, 40), (1, 23, 23)])
    num_blocks, block_size, num_kv_heads, head_dim = case.k_cache.shape
    k, v = new_kv_cache(num_blocks, block_size, num_kv_heads, head_dim, torch.float32)
    flat_k = case.k_cache.reshape(-1, num_kv_heads, head_dim)
    flat_v = case.v_cache.reshape(-1, num_kv_heads, head_dim)
    store_kv_cpu(flat_k[meta.slot_mapping], flat_v[meta.slot_mapping], k, v, meta.slot_mapping)
    assert torch.equal(k.reshape(-1, num_kv_heads, head_dim)[meta.slot_mapping], flat_k[meta.slot_mapping])
    assert torch.equal(v.reshape(-1, num_kv_heads, head_dim)[meta.slot_mapping], flat_v[meta.slot_mapping])
    got = paged_attention_cpu(q, k, v, meta, 0.2)
    assert torch.equal(got, paged_attention_cpu(q, case.k_cache, case.v_cache, meta, 0.2))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_cache_holds_each_block_head_as_one_run(dtype: torch.dtype) -> None:
    """new_kv_cache: a (block, head)'s keys d-major, then its values, in one run of memory,
    and the block's heads one after another (what the layout's speed rests on)."""
    nb, bs, hkv, d = 3, 16, 2, 32
    k, v = new_kv_cache(nb, bs, hkv, d, dtype)
    size = k.element_size()
    for b in range(nb):
        for h in range(hkv):
            start = k.data_ptr() + ((b * hkv + h) * 2 * bs * d) * size
            keys, values = k[b, :, h], v[b, :, h]  # [BS, D]
            assert keys.data_ptr() == start and keys.stride() == (1, bs)  # [D, BS] in place
            assert values.data_ptr() == start + bs * d * size and values.stride() == (d, 1)
    # The views alias no element: every (block, slot, head, d) of K and V is its own.
    k.copy_(torch.arange(k.numel(), dtype=torch.float32).view(k.shape))
    v.fill_(-1)
    assert bool((k >= 0).all())


def test_cpu_op_propagates_nan_from_a_live_key(paged_case: Callable) -> None:
    """A NaN inside a sequence (not past its end) must reach that sequence's output,
    not be clamped away, and must not touch the other sequence."""
    case = paged_case([21, 9], 4, 2, 32, 16, seed=5)
    q, meta = case.batch([(0, 21, 1), (1, 9, 1)])
    case.k_cache[case.tables[0][0], 3, 0] = float("nan")
    out = paged_attention_cpu(q, case.k_cache, case.v_cache, meta, 0.2)
    assert out[0, :2].isnan().all() and not out[1].isnan().any()
