"""The CPU attention's decode path (kernels/csrc/paged_decode.h) against its general path.

Single-token items on new_kv_cache's layout run a separate copy of the same operations;
on any other layout the same items run the general path. Both must give the same bits,
for fp32 and bf16 caches, GQA groups of 1-7 rows (score passes of up to 4, values passes
of 4 or 2), head dims 64 and 128, blocks of 16 and 32, lengths at and around every
16-key chunk and block end, with a prefill chunk in the same call; and stale slots (NaN)
past a sequence's end must stay inert.
"""
from __future__ import annotations

from typing import Callable

import pytest
import torch

from kernels.attention import paged_attention_torch
from kernels.attention_cpu import new_kv_cache, paged_attention_cpu

LENS = [1, 15, 16, 17, 33, 64, 100, 47]
# (sequence, seq_len, q_len): decodes at every length above, then a prefill chunk of 20.
ITEMS = [(i, n, 1) for i, n in enumerate(LENS[:-1])] + [(len(LENS) - 1, 47, 20)]


def _joint(k: torch.Tensor, v: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    nb, bs, hkv, d = k.shape
    jk, jv = new_kv_cache(nb, bs, hkv, d, dtype)
    jk.copy_(k)
    jv.copy_(v)
    return jk, jv


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "num_heads,num_kv_heads,head_dim,block_size",
    [(9, 3, 64, 16), (8, 2, 64, 32), (14, 2, 64, 16), (8, 2, 128, 16), (4, 4, 64, 16), (6, 1, 128, 32)],
)
def test_decode_path_matches_general_path(
    paged_case: Callable, dtype: torch.dtype, num_heads: int, num_kv_heads: int, head_dim: int, block_size: int
) -> None:
    case = paged_case(LENS, num_heads, num_kv_heads, head_dim, block_size, seed=num_heads + head_dim)
    q, meta = case.batch(ITEMS)
    scale = head_dim**-0.5
    plain_k, plain_v = case.k_cache.to(dtype), case.v_cache.to(dtype)  # [NB, BS, Hkv, D]: the general path
    general = paged_attention_cpu(q, plain_k, plain_v, meta, scale)
    decode = paged_attention_cpu(q, *_joint(plain_k, plain_v, dtype), meta, scale)
    assert torch.equal(decode, general)
    ref = paged_attention_torch(q, plain_k.float(), plain_v.float(), meta, scale)
    torch.testing.assert_close(decode, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_path_ignores_stale_slots(paged_case: Callable, dtype: torch.dtype) -> None:
    case = paged_case(LENS, 9, 3, 64, 16, seed=7)
    q, meta = case.batch(ITEMS)
    k, v = _joint(case.k_cache, case.v_cache, dtype)
    ref = paged_attention_cpu(q, k, v, meta, 0.125)
    used = torch.zeros(k.shape[:2], dtype=torch.bool)
    for seq, seq_len, _ in ITEMS:
        for p in range(seq_len):
            used[case.tables[seq][p // 16], p % 16] = True
    k[~used] = float("nan")
    v[~used] = float("nan")
    assert torch.equal(paged_attention_cpu(q, k, v, meta, 0.125), ref)
