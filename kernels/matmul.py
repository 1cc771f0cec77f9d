"""Batch-invariant linear layer for the Triton backend: y = x @ w^T (+ b), fixed tiles.

Every output element y[m, n] is computed by one program, as fp32 partial products of
its row of x and its row of w over k-tiles of BLOCK_K taken in order 0, BLOCK_K, ...,
plus the bias, rounded once to the output dtype. The tile geometry (BLOCK_M, BLOCK_N,
BLOCK_K, warps, stages) is fixed per dtype and never chosen from M, there is no split-K
and no autotuning, and M is not specialized on, so one compiled kernel runs every batch:
a row's bits cannot depend on how many other rows share the call, or where.

fp32 runs IEEE fp32 dots (input_precision="ieee"; never TF32). bf16 runs tensor-core
dots with fp32 accumulation.

Under the Triton interpreter (CPU, tests) tl.dot is numpy's matmul, i.e. the BLAS of the
machine, whose value for a row depends on where the row sits in the tile (OpenBLAS with
OPENBLAS_CORETYPE=Haswell: rows fall into classes by position mod 12). A batch puts a
token at any row, so there the kernel forms the same dot as a broadcast product and a
sum over the k axis (ROW_SUM), the same operations for every row. On a GPU the dot is
the hardware's, the same for every row of the tile.
"""
from __future__ import annotations

import torch

try:  # the CPU engine runs without Triton; only the launcher below needs it
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only where Triton is absent
    triton = None

# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) per weight dtype; fixed, never from M.
TILES = {
    torch.float32: (64, 128, 64, 4, 2),
    torch.bfloat16: (64, 128, 64, 4, 3),
}


def linear_torch(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """The reference: x [M, K] @ w[N, K]^T (+ bias [N]) -> [M, N] in x's dtype."""
    return torch.nn.functional.linear(x, w, bias)


if triton is not None:

    @triton.jit(do_not_specialize=["M"])
    def _linear_kernel(
        x_ptr, w_ptr, b_ptr, out_ptr, M, N, K, stride_xm, stride_wn, stride_om,
        HAS_BIAS: tl.constexpr, FP32_DOT: tl.constexpr, ROW_SUM: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM] output rows
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN] output columns
        m_ok = rm < M
        n_ok = rn < N
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):  # k-tiles in order: one fixed K order per element
            rk = k0 + tl.arange(0, BLOCK_K)
            k_ok = rk < K
            x = tl.load(x_ptr + rm[:, None].to(tl.int64) * stride_xm + rk[None, :],
                        mask=m_ok[:, None] & k_ok[None, :], other=0.0)  # [BM, BK]
            w = tl.load(w_ptr + rn[:, None].to(tl.int64) * stride_wn + rk[None, :],
                        mask=n_ok[:, None] & k_ok[None, :], other=0.0)  # [BN, BK]
            if ROW_SUM:  # interpreter: the same numpy operations for every row
                prod = x.to(tl.float32)[:, :, None] * tl.trans(w).to(tl.float32)[None, :, :]
                acc += tl.sum(prod, axis=1)  # [BM, BN]
            elif FP32_DOT:
                acc = tl.dot(x, tl.trans(w), acc, input_precision="ieee")
            else:
                acc = tl.dot(x, tl.trans(w), acc)
        if HAS_BIAS:
            acc += tl.load(b_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        out = out_ptr + rm[:, None].to(tl.int64) * stride_om + rn[None, :]
        tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


def linear_triton(
    x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None, row_sum: bool | None = None
) -> torch.Tensor:
    """Same contract as linear_torch, batch-invariant. row_sum: None = by device (the
    broadcast-sum dot on CPU, i.e. under the interpreter; tl.dot on a GPU)."""
    if triton is None:
        raise RuntimeError("linear_triton needs the `triton` package")
    if x.dim() != 2 or w.dim() != 2 or x.shape[1] != w.shape[1]:
        raise ValueError(f"x {tuple(x.shape)} and w {tuple(w.shape)} do not fit together")
    if w.dtype not in TILES or x.dtype != w.dtype:
        raise ValueError(f"linear_triton takes x and w of one dtype in {list(TILES)}, got {x.dtype}, {w.dtype}")
    if bias is not None and (bias.shape != (w.shape[0],) or not bias.is_contiguous()):
        raise ValueError(f"bias must be a contiguous [{w.shape[0]}] tensor")
    if x.stride(1) != 1:
        x = x.contiguous()
    if w.stride(1) != 1:
        w = w.contiguous()
    (m, k), n = x.shape, w.shape[0]
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)  # [M, N]
    if m == 0:
        return out
    block_m, block_n, block_k, warps, stages = TILES[w.dtype]
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
    _linear_kernel[grid](
        x, w, bias if bias is not None else w, out, m, n, k, x.stride(0), w.stride(0), out.stride(0),
        HAS_BIAS=bias is not None, FP32_DOT=w.dtype == torch.float32,
        ROW_SUM=x.device.type != "cuda" if row_sum is None else row_sum,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps, num_stages=stages,
    )
    return out


def pack_linear_triton(w: torch.Tensor) -> torch.Tensor | None:
    """The weight as the kernel reads it ([N, K], rows contiguous): w itself when it is
    already so (no copy; the model's version check sees any in-place write); None for a
    dtype the kernel does not take."""
    if w.dim() != 2 or w.dtype not in TILES:
        return None
    return w if w.stride(1) == 1 else w.contiguous()


def packed_linear_triton(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None, n: int,
                         next_packed: torch.Tensor | None = None) -> torch.Tensor:
    """KernelOps.packed_linear: x [T, K] -> [T, n] through the fixed-tile kernel
    (next_packed, a cache hint for the CPU kernels, has no use here)."""
    if packed.shape[0] != n:
        raise ValueError(f"packed weight has {packed.shape[0]} rows, expected {n}")
    return linear_triton(x.to(packed.dtype), packed, bias)
