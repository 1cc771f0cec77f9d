"""The fixed-tile Triton linear layer (kernels/matmul.py).

- against a float64 x @ w^T + b, odd shapes (M, N, K not multiples of the tiles), with
  and without bias, both inner-product forms (the interpreter's row-sum and tl.dot):
  fp32 within 2e-5 relative to the row's scale;
- batch invariance, bitwise: each row alone equals the same row inside batches of
  every size and offset (under the interpreter: the row-sum form, whatever the BLAS);
- CUDA (marked): fp32 is IEEE (an error TF32 could never reach), bf16 within its
  rounding bound, and the same bitwise row invariance on the compiled kernel.
"""
from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

import pytest
import torch

from kernels.matmul import linear_triton, pack_linear_triton, packed_linear_triton
from tests.cuda_support import CUDA, interpreted_or_skip

SHAPES = [(1, 64, 128), (37, 96, 200), (130, 130, 70)]


def _ref(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    y = x.double() @ w.double().T
    return y + b.double() if b is not None else y


def _inputs(m: int, k: int, n: int, device: str, dtype: torch.dtype = torch.float32, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=gen).to(device, dtype)
    w = torch.randn(n, k, generator=gen).to(device, dtype)
    b = torch.randn(n, generator=gen).to(device, dtype)
    return x, w, b


def _scale(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """|x| @ |w|^T: the size of the terms each output sums (bounds its rounding error)."""
    return x.double().abs() @ w.double().abs().T


@pytest.mark.usefixtures("need_triton")
@pytest.mark.parametrize("m,k,n", SHAPES)
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("row_sum", [True, False])
def test_matches_float64(m: int, k: int, n: int, with_bias: bool, row_sum: bool) -> None:
    interpreted_or_skip()
    x, w, b = _inputs(m, k, n, "cpu", seed=m + n)
    bias = b if with_bias else None
    y = linear_triton(x, w, bias, row_sum=row_sum)
    assert y.shape == (m, n) and y.dtype == torch.float32
    err = (y.double() - _ref(x, w, bias)).abs()
    assert (err <= 2e-6 * (_scale(x, w) + 1)).all(), f"max error {err.max().item():.3g}"


def _assert_rows_invariant(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> None:
    alone = torch.cat([linear_triton(x[i : i + 1], w, b) for i in range(x.shape[0])])
    for lo, hi in [(0, x.shape[0]), (3, 70), (1, 2), (5, 66), (64, x.shape[0])]:
        assert torch.equal(linear_triton(x[lo:hi], w, b), alone[lo:hi]), f"rows {lo}:{hi}"


@pytest.mark.usefixtures("need_triton")
def test_rows_invariant_to_batch_and_offset() -> None:
    interpreted_or_skip()
    x, w, b = _inputs(80, 64, 96, "cpu", seed=1)
    _assert_rows_invariant(x, w, b)


@pytest.mark.usefixtures("need_triton")
def test_packed_entry_points_and_bad_input() -> None:
    interpreted_or_skip()
    x, w, b = _inputs(5, 64, 32, "cpu", seed=2)
    packed = pack_linear_triton(w)
    assert packed is w  # already in the kernel's layout: no copy
    assert torch.equal(packed_linear_triton(x, packed, b, 32), linear_triton(x, w, b))
    assert pack_linear_triton(w.half()) is None
    with pytest.raises(ValueError, match="do not fit"):
        linear_triton(x, w[:, :10])
    with pytest.raises(ValueError, match="one dtype"):
        linear_triton(x.double(), w.double())
    assert linear_triton(x[:0], w).shape == (0, 32)


@pytest.mark.parametrize("m,k,n", SHAPES)
@pytest.mark.parametrize("_", [pytest.param(None, marks=CUDA)])
def test_cuda_fp32_is_ieee(m: int, k: int, n: int, _: None) -> None:
    x, w, b = _inputs(m, k, n, "cuda", seed=m)
    err = (linear_triton(x, w, b).double() - _ref(x, w, b)).abs()
    # TF32 rounds inputs to 10 mantissa bits (relative ~5e-4 per term); IEEE fp32 stays
    # near K * 2^-24 of the terms' scale.
    assert (err <= 2e-6 * (_scale(x, w) + 1)).all(), f"max error {err.max().item():.3g}: TF32?"


@pytest.mark.parametrize("_", [pytest.param(None, marks=CUDA)])
def test_cuda_bf16_within_rounding(_: None) -> None:
    x, w, b = _inputs(77, 576, 1536, "cuda", torch.bfloat16, seed=3)
    y = linear_triton(x, w, b)
    assert y.dtype == torch.bfloat16
    # Exact products of bf16 inputs summed in fp32, one rounding to bf16 (2^-8 relative).
    err = (y.double() - _ref(x, w, b)).abs()
    assert (err <= 2**-8 * _ref(x, w, b).abs() + 1e-4 * (_scale(x, w) + 1)).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("_", [pytest.param(None, marks=CUDA)])
def test_cuda_rows_invariant(dtype: torch.dtype, _: None) -> None:
    x, w, b = _inputs(80, 576, 200, "cuda", dtype, seed=4)
    _assert_rows_invariant(x, w, b)
