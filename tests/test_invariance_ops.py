"""Row invariance of the CPU ops the model runs, measured op by op.

A row's result must not depend on how many other rows share the call, where the row
sits, or how many threads run it. Each test computes every row alone and inside larger
batches and compares bitwise. Negative controls show the same check catches a
batch-dependent op: planted ones (1 ulp whenever a call holds more than one row) fail
for our own reason on every machine; the measured ones (raw torch ops that were NOT
row-invariant on the machines we measured: MKL small-M sgemm, oneDNN's packed GEMM at
K = 1536, F.silu's vectorized body vs scalar tail) skip, saying so, where this
machine's library happens to be invariant.
"""
from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F

from tests.invariance_harness import num_threads
from asyncengine.models.llama import DEFAULT_GEMM_TILE_ROWS, linear, prepack, silu_mul
from kernels.attention import AttentionMetadata, paged_attention_torch
from kernels.attention_cpu import paged_attention_cpu
from kernels.rmsnorm import rms_norm_torch

# (in, out) of the projections of the tiny test models and of SmolLM2-135M.
GEMM_SHAPES = [(64, 128), (64, 256), (128, 64), (64, 384), (576, 960), (1536, 576)]
ROW_COUNTS = list(range(1, 41)) + [63, 64, 65, 127, 128, 129, 200]


def library_is_batch_dependent(bad: list[int], what: str) -> None:
    """A measured control: pass when the library op is batch-dependent here, else skip
    (another CPU or BLAS build may be invariant; the planted controls still run)."""
    if not bad:
        pytest.skip(f"{what} happens to be row-invariant on this machine; nothing to show")


def rows_that_differ(op: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, counts: list[int]) -> list[int]:
    """Row counts M for which op(x[:M]) differs in some row from that row computed alone."""
    alone = torch.cat([op(x[i : i + 1]) for i in range(max(counts))])
    return [m for m in counts if not torch.equal(op(x[:m]), alone[:m])]


@pytest.mark.parametrize("tile", [16, DEFAULT_GEMM_TILE_ROWS])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("packed", [False, True], ids=["mkl", "onednn-packed"])
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("k,n", GEMM_SHAPES + [(576, 49152)])
def test_linear_rows_are_invariant(k: int, n: int, threads: int, packed: bool, dtype: torch.dtype, tile: int) -> None:
    """Tiled GEMMs: every row count, alone or among up to 200 rows (several tiles), the
    same bits per row. Untiled GEMMs fail this (controls below; and oneDNN's bf16 GEMM
    on AMX past ~40 rows, measured on Sapphire Rapids)."""
    g = torch.Generator().manual_seed(k * n)
    w, b = torch.randn(n, k, generator=g).to(dtype), torch.randn(n, generator=g).to(dtype)
    x = torch.randn(max(ROW_COUNTS), k, generator=g).to(dtype)
    pw = prepack(w) if packed else None
    if packed and pw is None:
        pytest.fail("oneDNN prepacking is unavailable in this torch build")
    counts = ROW_COUNTS if n < 10000 else [1, 2, 3, 15, 16, 17, 64, 65, 200]  # the head: fewer
    with num_threads(threads):
        assert rows_that_differ(lambda t: linear(t, w, b, tile, pw), x, counts) == []


@pytest.mark.parametrize("threads", [1, 2])
def test_negative_control_unpadded_packed_gemm_is_not_row_invariant(threads: int) -> None:
    """Measured: oneDNN's packed GEMM at K = 1536 (SmolLM2's down projection) rounds a
    lone row differently from the same row among others, without the tiling."""
    g = torch.Generator().manual_seed(1)
    w, x = torch.randn(576, 1536, generator=g), torch.randn(64, 1536, generator=g)
    pw = prepack(w)
    if pw is None:
        pytest.skip("oneDNN prepacking is unavailable in this torch build")
    with num_threads(threads):
        bad = rows_that_differ(lambda t: linear(t, w, None, 0, pw), x, list(range(1, 33)))
    library_is_batch_dependent(bad, "oneDNN's untiled packed GEMM at K = 1536")


@pytest.mark.parametrize("threads", [1, 2])
def test_negative_control_unpadded_gemm_is_not_row_invariant(threads: int) -> None:
    """Measured: MKL sgemm rounds a row differently for small M (up to 3 rows on 1 thread,
    11 on 2, on AMD Zen4 and Intel Sapphire Rapids alike) than for larger M -- one reason
    linear() runs fixed-size tiles."""
    g = torch.Generator().manual_seed(0)
    w, x = torch.randn(960, 576, generator=g), torch.randn(64, 576, generator=g)
    with num_threads(threads):
        full = F.linear(x, w)
        bad = [m for m in range(1, 33) if not torch.equal(F.linear(x[:m], w), full[:m])]
    library_is_batch_dependent(bad, "the BLAS sgemm behind F.linear")


@pytest.mark.parametrize("threads", [1, 2])
def test_negative_control_planted_batch_dependent_gemm(threads: int) -> None:
    """Planted: the tiled linear() with 1 ulp added whenever a call holds more than one
    row. The check must see it on any machine."""
    g = torch.Generator().manual_seed(0)
    w, x = torch.randn(960, 576, generator=g), torch.randn(64, 576, generator=g)

    def batch_dependent(t: torch.Tensor) -> torch.Tensor:
        out = linear(t, w, None, DEFAULT_GEMM_TILE_ROWS, None)
        return out * (1.0 + 2.0**-23) if t.shape[0] > 1 else out

    with num_threads(threads):
        assert rows_that_differ(batch_dependent, x, list(range(1, 33))) == list(range(2, 33))


@pytest.mark.parametrize("threads", [1, 2, 5])
@pytest.mark.parametrize("inter", [128, 1000, 1536])
def test_silu_mul_rows_are_invariant(inter: int, threads: int) -> None:
    g = torch.Generator().manual_seed(inter)
    x = torch.randn(300, 2 * inter, generator=g) * 4
    with num_threads(threads):
        assert rows_that_differ(lambda t: silu_mul(t, exact=True), x, list(range(1, 80)) + [299, 300]) == []


def test_negative_control_f_silu_is_not_row_invariant() -> None:
    """Measured: F.silu uses a faster exp in its vectorized body than in its scalar tail,
    so a row split between threads at a column that is not a multiple of 32 rounds
    differently (intermediate 1000 with 2 threads; SmolLM2's 1536 with 5 threads)."""
    g = torch.Generator().manual_seed(1000)
    x = torch.randn(300, 2000, generator=g) * 4
    with num_threads(2):
        bad = rows_that_differ(lambda t: silu_mul(t, exact=False), x, list(range(30, 60)))
    library_is_batch_dependent(bad, "F.silu")


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("hidden", [32, 64, 576])
def test_rms_norm_rows_are_invariant(hidden: int, threads: int) -> None:
    g = torch.Generator().manual_seed(hidden)
    x, r = torch.randn(300, hidden, generator=g), torch.randn(300, hidden, generator=g)
    w = 1 + 0.1 * torch.randn(hidden, generator=g)
    xr = torch.cat([x, r], dim=1)
    with num_threads(threads):
        op = lambda t: torch.cat(rms_norm_torch(t[:, :hidden], w, 1e-6, t[:, hidden:].clone()), dim=1)  # noqa: E731
        assert rows_that_differ(op, xr, ROW_COUNTS) == []


# --- paged attention ------------------------------------------------------------------
BLOCK = 16


def _meta(chunks: list[tuple[int, int]], tables: list[list[int]]) -> AttentionMetadata:
    """chunks: (seq_len after the step, query rows) per sequence."""
    qsl = [0]
    for _, q in chunks:
        qsl.append(qsl[-1] + q)
    width = max(len(t) for t in tables)
    padded = [t + [0] * (width - len(t)) for t in tables]
    positions = [p for n, q in chunks for p in range(n - q, n)]
    return AttentionMetadata(
        query_start_loc=torch.tensor(qsl), seq_lens=torch.tensor([n for n, _ in chunks]),
        block_tables=torch.tensor(padded), slot_mapping=torch.zeros(qsl[-1], dtype=torch.int64),
        positions=torch.tensor(positions), query_start_loc_list=qsl, seq_lens_list=[n for n, _ in chunks],
    )


@pytest.mark.parametrize("impl", [paged_attention_torch, paged_attention_cpu], ids=["torch", "cpu"])
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("heads,kv_heads,head_dim", [(4, 2, 16), (9, 3, 64)])
def test_paged_attention_rows_are_invariant(
    heads: int, kv_heads: int, head_dim: int, threads: int, impl: Callable[..., torch.Tensor]
) -> None:
    """The query at position p of one sequence gives the same bits as a decode alone, as
    a decode among others of any length, and as any row of a prefill chunk of any size."""
    g = torch.Generator().manual_seed(heads)
    num_blocks, length = 64, 100
    k_cache = torch.randn(num_blocks, BLOCK, kv_heads, head_dim, generator=g)
    v_cache = torch.randn(num_blocks, BLOCK, kv_heads, head_dim, generator=g)
    table = torch.randperm(num_blocks - 1, generator=g)[: -(-length // BLOCK)].add(1).tolist()
    others = [(n, torch.randperm(num_blocks, generator=g)[: -(-n // BLOCK)].tolist()) for n in (1, 37, 64, 65, 300)]
    queries = torch.randn(length, heads, head_dim, generator=g)  # query of position p

    def attend(chunks: list[tuple[int, int]], tables: list[list[int]], q: torch.Tensor) -> torch.Tensor:
        return impl(q, k_cache, v_cache, _meta(chunks, tables), head_dim**-0.5)

    with num_threads(threads):
        alone = torch.cat([attend([(p + 1, 1)], [table], queries[p : p + 1]) for p in range(length)])
        mismatches = []
        for n, t in others:  # the last position decoded beside another sequence
            q = torch.cat([torch.randn(1, heads, head_dim, generator=g), queries[-1:]])
            out = attend([(n, 1), (length, 1)], [t, table], q)
            mismatches += [] if torch.equal(out[1:], alone[-1:]) else [("decode beside", n)]
        for start, end in [(0, length), (0, 17), (16, 80), (64, 65), (70, 100), (99, 100)]:
            out = attend([(end, end - start)], [table], queries[start:end])
            mismatches += [] if torch.equal(out, alone[start:end]) else [("chunk", start, end)]
        assert mismatches == []


def test_negative_control_attention_batch_dependence() -> None:
    """The check above catches an attention whose rounding depends on the batch: here 1 ulp
    planted whenever a call holds more than one query row. (Unpadded torch attention was
    such an op on AMD Zen4's MKL, G-row bmm rounding apart from 16-row bmm; on Sapphire
    Rapids it is not, so the dependence is planted rather than measured.)"""

    def batch_dependent(q: torch.Tensor, *args: object) -> torch.Tensor:
        out = paged_attention_torch(q, *args)  # type: ignore[arg-type]
        return out * (1.0 + 2.0**-23) if q.shape[0] > 1 else out

    with pytest.raises(AssertionError):
        test_paged_attention_rows_are_invariant(4, 2, 16, 1, batch_dependent)
