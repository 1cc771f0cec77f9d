"""The compiled CPU fused ops (kernels/csrc/fused_ops_cpu.cpp) and linear layer
(kernels/csrc/gemm_cpu.cpp) against their torch references.

RoPE + KV store rounds exactly as the torch path does (bitwise equal); RMSNorm sums its
squares in another order (within 1 ulp-scale tolerance) and SiLU uses our own exp (within
a few ulp). All three must be row-invariant bitwise: a row alone, among others, on 1 or
2 threads.
"""
from __future__ import annotations

import pytest
import torch

from asyncengine.models.llama import silu_mul
from kernels.attention_cpu import (
    load, new_kv_cache, pack_linear_weight, packed_linear_cpu, rms_norm_cpu, rope_store_kv_cpu, silu_mul_cpu, store_kv_cpu,
)
from kernels.rmsnorm import rms_norm_torch
from kernels.rope import apply_rope_torch, rope_cos_sin
from tests.invariance_harness import num_threads, rows_invariant

DTYPES = [torch.float32, torch.bfloat16]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", [64, 100, 576])
def test_rms_norm_matches_torch_and_is_row_invariant(hidden: int, dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(hidden)
    x = (torch.randn(70, hidden, generator=g) * 3).to(dtype)
    r = torch.randn(70, hidden, generator=g).to(dtype)
    w = (1 + 0.1 * torch.randn(hidden, generator=g)).to(dtype)
    for residual in (None, r):
        y, new_r = rms_norm_cpu(x, w, 1e-5, residual)
        want_y, want_r = rms_norm_torch(x, w, 1e-5, None if residual is None else residual.clone())
        tol = {"rtol": 2e-6, "atol": 2e-6} if dtype == torch.float32 else {"rtol": 8e-3, "atol": 8e-3}
        torch.testing.assert_close(y, want_y, **tol)
        if residual is None:
            assert new_r is None
        else:
            assert torch.equal(new_r, want_r)  # the add is one rounding either way
    xr = torch.cat([x, r], dim=1)
    assert rows_invariant(lambda t: torch.cat(rms_norm_cpu(t[:, :hidden], w, 1e-5, t[:, hidden:]), dim=1), xr)


def test_bf16_vector_rounding_is_torchs_on_ties_subnormals_and_specials() -> None:
    """The residual add (one bf16 rounding of an fp32 sum, computed 16 lanes at a time)
    equals torch's bit for bit, where a hardware conversion would differ: subnormal sums
    (VCVTNEPS2BF16 treats them as zero), ties to even, infinities, signed zeros."""
    f = torch.tensor([1e-39, -3e-40, 1.0 + 2.0**-8, 1.0 + 3 * 2.0**-8, float("nan"), float("inf"),
                      -float("inf"), -0.0, 0.0, 3.0e38, 1.0, -2.5, 7e-39, 1.0 + 2.0**-9, -1e-45, 65504.0])
    x = f.repeat(36).bfloat16().view(1, 576)  # every value in the 16-lane body
    r = torch.zeros_like(x)
    r[0, 2::16] = torch.tensor(2.0**-9).bfloat16()  # 1 + 2^-8 + 2^-9: a tie in fp32, rounds to even
    _, new_r = rms_norm_cpu(x, torch.ones(576).bfloat16(), 1e-5, r)
    want = (r.float() + x.float()).bfloat16()
    nan = want.isnan()  # NaN stays NaN (the payload is c10's scalar one, 0x7FC0)
    assert torch.equal(new_r.isnan(), nan) and nan.sum() == 36
    assert torch.equal(new_r[~nan].view(torch.int16), want[~nan].view(torch.int16))


def test_bf16_vector_rounding_fast_path_is_torchs() -> None:
    """Vectors of normal sums only take the hardware conversion where the CPU has one
    (vec16.h's bf16_packed), a vector with a subnormal or NaN lane the bit-pattern path;
    both bit for bit torch's, side by side in one row: ties to even (down and up), overflow
    to infinity, signed zeros, magnitudes from 1e-30 to 1e30, one special in 3 of 36 vectors."""
    g = torch.Generator().manual_seed(7)
    mag = 10.0 ** torch.randint(-30, 31, (576,), generator=g).float()
    a = (torch.randn(576, generator=g) * mag).bfloat16()
    b = (torch.randn(576, generator=g) * mag * 2.0**-5).bfloat16()
    pairs = [(1.0, 2.0**-8), (1.0 + 2.0**-7, 2.0**-8), (-1.0, -(2.0**-8)), (3.3895e38, 2.0**120),
             (-3.3895e38, -(2.0**120)), (-0.0, -0.0), (0.0, -0.0), (2.0**-126, 2.0**-133)]
    for i, (u, v) in enumerate(pairs):
        a[i], b[i] = u, v
    a[100], b[100], a[133], a[250], b[250] = 1e-39, 0.0, float("nan"), 0.0, -5e-39  # subnormal or NaN sums
    _, new_r = rms_norm_cpu(b.view(1, 576), torch.ones(576).bfloat16(), 1e-5, a.view(1, 576))
    want = (a.float() + b.float()).bfloat16().view(1, 576)
    nan = want.isnan()
    assert torch.equal(new_r.isnan(), nan) and nan.sum() == 1
    assert torch.equal(new_r[~nan].view(torch.int16), want[~nan].view(torch.int16))
    assert new_r[0, 0] == 1.0 and new_r[0, 1] == 1.0 + 2.0**-6 and new_r[0, 3].isinf()  # tie down, tie up, overflow
    assert new_r[0, 100] > 0 > new_r[0, 250]  # subnormal sums kept, not flushed to zero


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("inter", [40, 1536])
def test_silu_mul_matches_exact_silu_and_is_row_invariant(inter: int, dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(inter)
    x = torch.randn(50, 2 * inter, generator=g) * 6
    x[0, :4] = torch.tensor([0.0, -0.0, 100.0, -100.0])  # zeros and far tails stay finite
    x = x.to(dtype)
    got = silu_mul_cpu(x)
    want = silu_mul(x.double(), exact=True).to(dtype)  # float64 reference, rounded once
    tol = {"rtol": 3e-6, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 1.6e-2, "atol": 1e-5}
    torch.testing.assert_close(got, want, **tol)
    assert torch.isfinite(got).all()
    assert rows_invariant(silu_mul_cpu, x)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", [64, 80, 128])
@pytest.mark.parametrize("layout", ["new_kv_cache", "plain"])
def test_rope_store_kv_equals_torch_rope_then_store(dtype: torch.dtype, d: int, layout: str) -> None:
    """Bitwise: the fused pass rounds like apply_rope_torch + store_kv, into the CPU
    cache layout (keys d-major) or a plain [NB, BS, Hkv, D] one, from strided slices of
    a fused qkv tensor; d = 80 rotates a half of 40: 16-lane body and scalar tail."""
    g = torch.Generator().manual_seed(3)
    t, hq, hkv, nb, bs = 21, 6, 2, 8, 16
    qkv = torch.randn(t, (hq + 2 * hkv) * d, generator=g).to(dtype)
    qkv[0, :4] = torch.tensor([0.0, -0.0, float("inf"), float("nan")])  # signed zeros and specials
    q, k, v = qkv.split([hq * d, hkv * d, hkv * d], dim=-1)
    q, k, v = q.reshape(t, hq, d), k.reshape(t, hkv, d), v.reshape(t, hkv, d)
    positions = torch.randint(0, 500, (t,), generator=g)
    slots = torch.randperm(nb * bs, generator=g)[:t]
    cos_sin = rope_cos_sin(1.0 / 10000 ** (torch.arange(0, d, 2).float() / d), 1.0, 512)

    def cache() -> tuple[torch.Tensor, torch.Tensor]:
        if layout == "new_kv_cache":
            return new_kv_cache(nb, bs, hkv, d, dtype)
        return torch.zeros(nb, bs, hkv, d, dtype=dtype), torch.zeros(nb, bs, hkv, d, dtype=dtype)

    (kc, vc), (kc2, vc2) = cache(), cache()
    qf = rope_store_kv_cpu(q, k, v, positions, cos_sin, kc, vc, slots)
    want_q, want_k = apply_rope_torch(q, k, positions, cos_sin)
    store_kv_cpu(want_k, v, kc2, vc2, slots)
    assert qf.dtype == torch.float32 and qf.isnan().any() and qf.isinf().any()
    for got, want in ((qf, want_q.float()), (kc.float(), kc2.float()), (vc.float(), vc2.float())):
        nan = want.isnan()  # NaN stays NaN (torch's vector and scalar bf16 roundings differ in payload)
        assert torch.equal(got.isnan(), nan)
        assert torch.equal(got[~nan].view(torch.int32), want[~nan].view(torch.int32))  # -0 and inf too


def test_rope_store_kv_rejects_out_of_range_slots() -> None:
    q, k = torch.zeros(2, 2, 16), torch.zeros(2, 1, 16)
    kc, vc = new_kv_cache(2, 16, 1, 16, torch.float32)
    cos_sin = torch.zeros(8, 16)
    with pytest.raises(RuntimeError, match="out of range"):
        rope_store_kv_cpu(q, k, k, torch.tensor([0, 1]), cos_sin, kc, vc, torch.tensor([0, 32]))
    with pytest.raises(RuntimeError, match="out of range"):
        rope_store_kv_cpu(q, k, k, torch.tensor([0, 8]), cos_sin, kc, vc, torch.tensor([0, 1]))


@pytest.mark.parametrize("k,n", [(64, 128), (33, 17), (576, 960), (1536, 576), (576, 4000)])
def test_packed_linear_matches_float64_and_is_row_invariant(k: int, n: int) -> None:
    """FMA chains over 64-k blocks, summed in order: as accurate as a BLAS sgemm (error
    scaled by the row's |x| . |w| mass), and bitwise the same row alone, among others, in
    any tile position, on 1 or 2 threads, with and without bias."""
    g = torch.Generator().manual_seed(k * n)
    w, b, x = torch.randn(n, k, generator=g), torch.randn(n, generator=g), torch.randn(150, k, generator=g)
    packed = pack_linear_weight(w)
    assert packed is not None and packed.shape == (-(-n // 16), k, 16)
    for bias in (None, b):
        got = packed_linear_cpu(x, packed, bias, n)
        want = x.double() @ w.double().t() + (0 if bias is None else bias.double())
        scale = x.double().abs() @ w.double().abs().t()  # the magnitude rounding acts on
        assert ((got.double() - want).abs() <= 2e-7 * k**0.5 * scale + 1e-6).all()
        assert rows_invariant(lambda t: packed_linear_cpu(t, packed, bias, n), x)


@pytest.mark.parametrize("k", [576, 1536])
def test_packed_linear_rounds_at_most_half_a_sequential_sum(k: int) -> None:
    """The k blocks are there for accuracy (the kernel's former single chain over all of K
    put SmolLM2's logprobs 2-4x farther from float64 than HF's sgemm): at SmolLM2's K the
    blocked sums' RMS error is at most half a plain sequential sum's (mul then add, k
    ascending; measured 0.36x at 576, 0.25x at 1536)."""
    g = torch.Generator().manual_seed(k)
    w, x = torch.randn(256, k, generator=g), torch.randn(64, k, generator=g)
    want = x.double() @ w.double().t()
    got = packed_linear_cpu(x, pack_linear_weight(w), None, 256)
    seq = torch.zeros(64, 256)
    for j in range(k):  # fl(acc + fl(x * w)), k ascending
        seq = seq + x[:, j : j + 1] * w[:, j]

    def rms(t: torch.Tensor) -> float:
        return float(((t.double() - want) ** 2).mean().sqrt())

    assert rms(got) <= 0.5 * rms(seq)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int32)  # torch.equal would take -0.0 for +0.0


@pytest.mark.parametrize("m,k,n", [(150, 576, 4000), (70, 1536, 72), (9, 33, 17), (1, 1, 40), (23, 64, 96)])
def test_packed_linear_is_bitwise_the_scalar_fma_chain(m: int, k: int, n: int) -> None:
    """The kernel's contract, bit for bit: y[i, c] = the FMA chains over 64-k blocks (k
    ascending from +0) summed in block order from +0, then + bias, as a scalar loop
    (linear_fma_reference) computes it: every register tile (8-row and 3-panel ones, their
    row and panel tails, partial groups) on 1 and 2 threads, including signed zeros,
    infinities and NaN; with or without the next call's packing to hint (never a value)."""
    load()
    ref = torch.ops.asyncengine_cpu.linear_fma_reference
    g = torch.Generator().manual_seed(m * k + n)
    w, b, x = torch.randn(n, k, generator=g), torch.randn(n, generator=g), torch.randn(m, k, generator=g)
    x[0, :] = -0.0  # products -0: the chain from +0 must give +0, not -0
    if m > 2:
        x[1, k // 2], x[2, 0] = float("inf"), float("nan")
    w[n // 2, :] = -0.0
    packed, after = pack_linear_weight(w), pack_linear_weight(torch.randn(700, 96, generator=g))
    for threads in (1, 2):
        with num_threads(threads):
            for bias in (None, b):
                want = ref(x, w, bias)
                for nxt in (None, after, packed):
                    assert torch.equal(_bits(packed_linear_cpu(x, packed, bias, n, nxt)), _bits(want))
    assert _bits(packed_linear_cpu(x, packed, None, n))[0].eq(0).all()  # +0.0 exactly


def test_fma_reference_matches_float64() -> None:
    """The scalar reference itself is the sgemm-accurate chain (checked independently of
    any kernel against float64), so the bitwise test above pins the right numbers."""
    load()
    g = torch.Generator().manual_seed(5)
    w, b, x = torch.randn(40, 300, generator=g), torch.randn(40, generator=g), torch.randn(11, 300, generator=g)
    got = torch.ops.asyncengine_cpu.linear_fma_reference(x, w, b).double()
    want = x.double() @ w.double().t() + b.double()
    scale = x.double().abs() @ w.double().abs().t()
    assert ((got - want).abs() <= 2e-7 * 300**0.5 * scale + 1e-6).all()


def test_packed_linear_rejects_mismatched_shapes_and_other_dtypes() -> None:
    w = torch.randn(40, 24)
    packed = pack_linear_weight(w)
    assert pack_linear_weight(w.half()) is None  # fp16 stays with oneDNN (bf16: tests/kernels/test_gemm_amx.py)
    with pytest.raises(RuntimeError, match="K"):
        packed_linear_cpu(torch.randn(3, 25), packed, None, 40)
    with pytest.raises(RuntimeError, match="n does not match"):
        packed_linear_cpu(torch.randn(3, 24), packed, None, 60)
    with pytest.raises(RuntimeError, match="bias"):
        packed_linear_cpu(torch.randn(3, 24), packed, torch.randn(39), 40)
    assert packed_linear_cpu(torch.randn(0, 24), packed, None, 40).shape == (0, 40)
    with pytest.raises(RuntimeError, match="next must be a packed fp32 weight"):
        torch.ops.asyncengine_cpu.packed_linear(torch.randn(3, 24), packed, None, 40, torch.randn(40, 24))
    x = torch.randn(9, 24)  # another kernel's packing (bf16) is not hinted by the fp32 kernel: ignored
    assert torch.equal(packed_linear_cpu(x, packed, None, 40, packed.bfloat16()), packed_linear_cpu(x, packed, None, 40))
