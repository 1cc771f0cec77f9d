"""The bf16 linear layer on AMX tiles (kernels/csrc/gemm_amx_cpu.cpp), on CPUs that have
AMX-BF16 (elsewhere bf16 GEMMs stay with oneDNN in row tiles and this file is skipped).

Each output element is the fp32 sum of exact bf16 products over k-blocks of 32 in order,
rounded once to bf16: within that rounding of a float64 reference, and bitwise the same
for a row alone, among others, in any tile position, on 1 or 2 threads.
"""
from __future__ import annotations

import pytest
import torch

from kernels import attention_cpu
from kernels.attention_cpu import pack_linear_weight, packed_linear_cpu
from tests.invariance_harness import rows_invariant


def _amx() -> bool:
    return attention_cpu.available() and bool(torch.ops.asyncengine_cpu.amx_available())


pytestmark = pytest.mark.skipif(not _amx(), reason="this CPU has no AMX-BF16")


@pytest.mark.parametrize("k,n", [(64, 128), (33, 17), (576, 960), (1536, 576), (100, 70)])
def test_amx_linear_matches_float64_and_is_row_invariant(k: int, n: int) -> None:
    g = torch.Generator().manual_seed(k * n)
    w = torch.randn(n, k, generator=g).bfloat16()
    b, x = torch.randn(n, generator=g).bfloat16(), torch.randn(150, k, generator=g).bfloat16()
    packed = pack_linear_weight(w)
    assert packed is not None and packed.dtype == torch.bfloat16 and packed.shape == (-(-n // 32) * 2, -(-k // 32) * 16, 16, 2)
    for bias in (None, b):
        got = packed_linear_cpu(x, packed, bias, n)
        assert got.dtype == torch.bfloat16 and got.shape == (150, n)
        want = x.double() @ w.double().t() + (0 if bias is None else bias.double())
        scale = x.double().abs() @ w.double().abs().t()  # the magnitude fp32 sums round at
        # the fp32 accumulation's rounding (<= k u |x|.|w|, u = 2^-24), then one bf16
        # rounding of the result (half an ulp of 8 significant bits: <= 2^-8 relative)
        acc = k * 2.0**-24 * scale
        assert ((got.double() - want).abs() <= 2.0**-8 * (want.abs() + acc) + acc).all()
        assert rows_invariant(lambda t: packed_linear_cpu(t, packed, bias, n), x)


@pytest.mark.parametrize("m", [32, 64, 65, 1000])
def test_amx_linear_same_bits_read_in_place_or_from_the_padded_copy(m: int) -> None:
    """Full 32-row blocks of a contiguous x with K a multiple of 32 are read where they
    lie, the rest from a zero-padded copy: each row's bits are those of the row alone
    (always the copy), also for a strided x (all of it copied) and for rows taken in
    several L2 chunks (1000 rows of K = 576: two)."""
    g = torch.Generator().manual_seed(m)
    w, b = torch.randn(96, 576, generator=g).bfloat16(), torch.randn(96, generator=g).bfloat16()
    packed = pack_linear_weight(w)
    wide = torch.randn(m, 600, generator=g).bfloat16()
    x = wide[:, :576]  # strided rows
    alone = torch.cat([packed_linear_cpu(x[i : i + 1].contiguous(), packed, b, 96) for i in range(m)])
    assert torch.equal(packed_linear_cpu(x.contiguous(), packed, b, 96), alone)
    assert torch.equal(packed_linear_cpu(x, packed, b, 96), alone)


def test_amx_linear_rejects_bad_inputs() -> None:
    packed = pack_linear_weight(torch.randn(40, 24).bfloat16())
    assert packed is not None
    with pytest.raises(RuntimeError, match="bf16"):
        packed_linear_cpu(torch.randn(3, 24), packed, None, 40)  # fp32 x on a bf16 weight
    with pytest.raises(RuntimeError, match="K"):
        packed_linear_cpu(torch.randn(3, 40).bfloat16(), packed, None, 40)
    with pytest.raises(RuntimeError, match="n does not match"):
        packed_linear_cpu(torch.randn(3, 24).bfloat16(), packed, None, 70)
    with pytest.raises(RuntimeError, match="bias"):
        packed_linear_cpu(torch.randn(3, 24).bfloat16(), packed, torch.randn(39), 40)
    assert packed_linear_cpu(torch.randn(0, 24).bfloat16(), packed, None, 40).shape == (0, 40)
