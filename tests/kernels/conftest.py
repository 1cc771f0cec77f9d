"""Shared setup for the kernel tests: the Triton interpreter and paged-batch builders.

TRITON_INTERPRET must be set before triton is first imported (triton.jit picks the
interpreter at decoration time), so it is set here, before any kernel module loads.
"""
from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

from dataclasses import dataclass  # noqa: E402
from typing import Callable  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from kernels.attention import AttentionMetadata  # noqa: E402

try:
    import triton  # noqa: F401
except ImportError as exc:  # the only reason a kernel test may skip
    TRITON_MISSING: str | None = f"triton cannot be imported ({exc}); Triton kernel tests skipped"
else:
    TRITON_MISSING = None


@pytest.fixture
def need_triton() -> None:
    """Skip (with the reason) only when Triton itself is unavailable; fail loudly when the
    kernels were imported (by an earlier test module) before TRITON_INTERPRET was set."""
    if TRITON_MISSING is not None:
        pytest.skip(TRITON_MISSING)
    from kernels.dispatch import _interpreted

    if not torch.cuda.is_available() and not _interpreted():
        pytest.fail("kernels/* were imported before TRITON_INTERPRET=1 was set: set it at the "
                    "top of the root tests/conftest.py so that every test module sees it")


@dataclass(slots=True)
class PagedCase:
    """A paged KV cache holding every position of some sequences, plus a query vector for
    every position, so that any batch of (sequence, seq_len, q_len) can be cut from it."""

    k_cache: torch.Tensor  # [num_blocks, block_size, Hkv, D]
    v_cache: torch.Tensor  # [num_blocks, block_size, Hkv, D]
    tables: list[list[int]]  # KV block ids per sequence (shuffled, not the identity)
    queries: list[torch.Tensor]  # per sequence [max_len, Hq, D]

    def batch(self, items: list[tuple[int, int, int]]) -> tuple[torch.Tensor, AttentionMetadata]:
        """items: (sequence, seq_len, q_len); the queries are positions seq_len - q_len..seq_len-1."""
        block_size = self.k_cache.shape[1]
        qsl, positions, slots, rows = [0], [], [], []
        for seq, seq_len, q_len in items:
            qsl.append(qsl[-1] + q_len)
            rows.append(self.queries[seq][seq_len - q_len : seq_len])
            for pos in range(seq_len - q_len, seq_len):
                positions.append(pos)
                slots.append(self.tables[seq][pos // block_size] * block_size + pos % block_size)
        tables = [self.tables[seq] for seq, _, _ in items]
        width = max(len(t) for t in tables)
        lens = [seq_len for _, seq_len, _ in items]
        meta = AttentionMetadata(
            query_start_loc=torch.tensor(qsl, dtype=torch.int64),
            seq_lens=torch.tensor(lens, dtype=torch.int64),
            block_tables=torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int64),
            slot_mapping=torch.tensor(slots, dtype=torch.int64),
            positions=torch.tensor(positions, dtype=torch.int64),
            query_start_loc_list=qsl,
            seq_lens_list=lens,
        )
        return torch.cat(rows), meta


def make_paged_case(
    max_lens: list[int], num_heads: int, num_kv_heads: int, head_dim: int, block_size: int, seed: int = 0
) -> PagedCase:
    gen = torch.Generator().manual_seed(seed)
    num_blocks = sum(-(-n // block_size) for n in max_lens) + 3  # a few never-used blocks
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache, v_cache = torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)
    free = torch.randperm(num_blocks, generator=gen).tolist()
    tables = [[free.pop() for _ in range(-(-n // block_size))] for n in max_lens]
    queries = [torch.randn(n, num_heads, head_dim, generator=gen) for n in max_lens]
    return PagedCase(k_cache, v_cache, tables, queries)


@pytest.fixture
def paged_case() -> Callable[..., PagedCase]:
    return make_paged_case
