"""RMSNorm: the torch reference against a float64 formula, the Triton kernel (interpreter)
against the reference, and batch invariance. Tolerances: fp32 defaults of assert_close
(rtol 1.3e-6, atol 1e-5); the fused residual sum must match exactly."""
from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

import pytest
import torch

from kernels.rmsnorm import rms_norm_torch, rms_norm_triton

EPS = 1e-5


def _naive(x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor:
    h = (x if residual is None else x + residual).double()
    return weight.double() * h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + EPS)


def _inputs(tokens: int, hidden: int, seed: int) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, hidden, generator=gen) * 3
    return x, torch.randn(hidden, generator=gen), torch.randn(tokens, hidden, generator=gen)


@pytest.mark.parametrize("with_residual", [False, True])
def test_torch_reference_matches_float64_formula(with_residual: bool) -> None:
    x, w, r = _inputs(9, 576, seed=1)
    res = r if with_residual else None
    y, new_res = rms_norm_torch(x, w, EPS, res)
    torch.testing.assert_close(y.double(), _naive(x, w, res), rtol=1e-5, atol=1e-5)
    assert (new_res is None) == (res is None)


@pytest.mark.usefixtures("need_triton")
@pytest.mark.parametrize("tokens,hidden", [(1, 64), (7, 100), (33, 576)])
@pytest.mark.parametrize("with_residual", [False, True])
def test_triton_matches_torch(tokens: int, hidden: int, with_residual: bool) -> None:
    x, w, r = _inputs(tokens, hidden, seed=tokens + hidden)
    res = r if with_residual else None
    y_ref, res_ref = rms_norm_torch(x, w, EPS, res)
    y, new_res = rms_norm_triton(x, w, EPS, res)
    torch.testing.assert_close(y, y_ref)
    if with_residual:
        assert torch.equal(new_res, res_ref)
    else:
        assert new_res is None


@pytest.mark.usefixtures("need_triton")
def test_triton_accepts_non_contiguous_input() -> None:
    x, w, _ = _inputs(6, 128, seed=3)
    wide = torch.cat([x, x], dim=1)[:, :128]  # a strided view
    torch.testing.assert_close(rms_norm_triton(wide, w, EPS)[0], rms_norm_torch(x, w, EPS)[0])


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_batch_invariance(impl: str, request: pytest.FixtureRequest) -> None:
    if impl == "triton":
        request.getfixturevalue("need_triton")
    fn = rms_norm_torch if impl == "torch" else rms_norm_triton
    x, w, r = _inputs(13, 576, seed=4)
    batch, batch_res = fn(x, w, EPS, r)
    for row in (0, 6, 12):
        alone, alone_res = fn(x[row : row + 1], w, EPS, r[row : row + 1])
        assert torch.equal(alone[0], batch[row])
        assert torch.equal(alone_res[0], batch_res[row])
