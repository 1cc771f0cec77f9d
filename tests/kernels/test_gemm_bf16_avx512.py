"""The bf16 linear layer on AVX512-BF16 (kernels/csrc/gemm_bf16_avx512_cpu.cpp), the bf16
GEMM of CPUs without AMX. Called directly, so it is tested on AMX machines too (where the
engine picks the tile kernel); skipped on CPUs without AVX512-BF16. Both of its chains are
tested on any such CPU: "dot" (VDPBF16PS over k-pairs, AMD's default) and "fma" (fp32 FMA
over k, Intel's default).

Each output element is one fp32 chain of exact bf16 products over k in order, rounded once
to bf16: within that rounding and the fp32 accumulation's bound of a float64 reference
(the fma chain: bitwise equal to the chain written out in torch), and bitwise the same for
a row alone, among others, in any position, on 1 or 2 threads.
"""
from __future__ import annotations

import pytest
import torch

from kernels import attention_cpu
from kernels.attention_cpu import pack_linear_weight
from tests.invariance_harness import rows_invariant


def _avx512_bf16() -> bool:
    return attention_cpu.available() and bool(torch.ops.asyncengine_cpu.avx512_bf16_available())


pytestmark = pytest.mark.skipif(not _avx512_bf16(), reason="this CPU or build has no AVX512-BF16")


CHAINS = ("dot", "fma")


def _linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None, n: int,
            chain: str | None = None, next_packed: torch.Tensor | None = None) -> torch.Tensor:
    return torch.ops.asyncengine_cpu.packed_linear_bf16_avx512(
        x, packed, None if bias is None else bias.float(), n, chain, next_packed)


def _pack(w: torch.Tensor) -> torch.Tensor:
    # The AMX kernel's packing, which this kernel shares (pack_linear_weight returns None
    # on a CPU with neither bf16 kernel, and this file is skipped there).
    packed = pack_linear_weight(w)
    assert packed is not None and packed.dtype == torch.bfloat16
    return packed


# Odd N and K, K not a multiple of 16 (a packing block of x) nor of 32, N past a 32-column
# task; 150 rows: register tiles of 12 and 11 rows.
@pytest.mark.parametrize("chain", CHAINS)
@pytest.mark.parametrize("k,n", [(64, 128), (33, 17), (1, 5), (577, 961), (1536, 576), (101, 70)])
def test_avx512_bf16_linear_matches_float64(k: int, n: int, chain: str) -> None:
    g = torch.Generator().manual_seed(k * n)
    w = torch.randn(n, k, generator=g).bfloat16()
    b, x = torch.randn(n, generator=g).bfloat16(), torch.randn(150, k, generator=g).bfloat16()
    packed = _pack(w)
    for bias in (None, b):
        got = _linear(x, packed, bias, n, chain)
        assert got.dtype == torch.bfloat16 and got.shape == (150, n)
        want = x.double() @ w.double().t() + (0 if bias is None else bias.double())
        scale = x.double().abs() @ w.double().abs().t()  # the magnitude fp32 sums round at
        # the fp32 accumulation's rounding (<= (k + 1) u |x|.|w|, u = 2^-24: one rounding per
        # product added, one for the bias), then one bf16 rounding of the result (<= 2^-8
        # relative); products of bf16 values are exact in fp32
        acc = (k + 1) * 2.0**-24 * (scale + (0 if bias is None else bias.double().abs()))
        err = (got.double() - want).abs()
        assert (err <= 2.0**-8 * (want.abs() + acc) + acc).all(), float(err.max())
        # One wrong product would be far outside: the bound is that tight.
        assert not torch.equal(got, torch.zeros_like(got))


def _fma_chain(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """The fma chain written out: acc = fl(acc + x[:, k] * w[:, k]) for k in order, from 0,
    in fp32 (a product of two bf16 values is exact in fp32, so each step is one rounding,
    as an FMA's), then + bias, rounded once to bf16."""
    xf, wf = x.float(), w.float()  # [M, K], [N, K]
    acc = torch.zeros(x.shape[0], w.shape[0])  # [M, N] fp32
    for kk in range(x.shape[1]):
        acc = acc + xf[:, kk : kk + 1] * wf[:, kk]
    return (acc if bias is None else acc + bias.float()).bfloat16()


@pytest.mark.parametrize("k,n", [(64, 128), (33, 17), (1, 5), (577, 70), (1536, 64)])
def test_avx512_bf16_fma_chain_is_the_documented_one(k: int, n: int) -> None:
    # Bitwise, not within a bound: the fma chain's operations are fixed by the source.
    g = torch.Generator().manual_seed(3 * k + n)
    w, b = torch.randn(n, k, generator=g).bfloat16(), torch.randn(n, generator=g).bfloat16()
    x = torch.randn(75, k, generator=g).bfloat16()
    packed = _pack(w)
    for bias in (None, b):
        assert torch.equal(_linear(x, packed, bias, n, "fma"), _fma_chain(x, w, bias))


@pytest.mark.parametrize("chain", CHAINS)
@pytest.mark.parametrize("k,n", [(576, 960), (33, 17), (1536, 576)])
def test_avx512_bf16_linear_rows_are_invariant(k: int, n: int, chain: str) -> None:
    g = torch.Generator().manual_seed(k + n)
    w, b = torch.randn(n, k, generator=g).bfloat16(), torch.randn(n, generator=g).bfloat16()
    x = torch.randn(150, k, generator=g).bfloat16()
    packed = _pack(w)
    # alone vs among others at every position class, 1 vs 2 threads (the harness's checks)
    assert rows_invariant(lambda t: _linear(t, packed, b, n, chain), x)
    # and each row at another position than its own, among other rows
    perm = torch.randperm(150, generator=g)
    assert torch.equal(_linear(x[perm], packed, b, n, chain), _linear(x, packed, b, n, chain)[perm])
    # a block of many rows (a prefill chunk: x split into row blocks per task) vs alone
    big = torch.randn(700, k, generator=g).bfloat16()
    rows = [0, 1, 11, 12, 349, 350, 699]
    assert torch.equal(_linear(big, packed, b, n, chain)[rows], _linear(big[rows], packed, b, n, chain))
    # the next call's packing to hint as the call ends never changes a value
    after = _pack(torch.randn(3 * 96 + 32, 2 * k + 5, generator=g).bfloat16())
    for t in (x, big):
        assert torch.equal(_linear(t, packed, b, n, chain, after), _linear(t, packed, b, n, chain))


def test_avx512_bf16_chain_is_a_function_of_the_cpu() -> None:
    chain = torch.ops.asyncengine_cpu.avx512_bf16_chain()
    assert chain in CHAINS and chain == torch.ops.asyncengine_cpu.avx512_bf16_chain()
    vendor = next((line for line in open("/proc/cpuinfo") if line.startswith("vendor_id")), "")
    if "GenuineIntel" in vendor:
        assert chain == "fma"
    elif "AuthenticAMD" in vendor:
        assert chain == "dot"
    # the default is that chain
    g = torch.Generator().manual_seed(5)
    w, x = torch.randn(40, 96, generator=g).bfloat16(), torch.randn(9, 96, generator=g).bfloat16()
    assert torch.equal(_linear(x, _pack(w), None, 40), _linear(x, _pack(w), None, 40, chain))


@pytest.mark.parametrize("chain", CHAINS)
def test_avx512_bf16_linear_differs_from_a_reordered_sum(chain: str) -> None:
    # Negative control of our own: the same products summed in another order (float64,
    # then rounded) must differ somewhere, or the bound above could not tell orders apart.
    g = torch.Generator().manual_seed(7)
    w, x = torch.randn(64, 1536, generator=g).bfloat16(), torch.randn(64, 1536, generator=g).bfloat16()
    got = _linear(x, _pack(w), None, 64, chain)
    if chain == "dot":
        assert not torch.equal(got, (x.double() @ w.double().t()).bfloat16())
    else:  # the exact chain test above, in reverse k order, must see the difference
        assert not torch.equal(got, _fma_chain(x.flip(1), w.flip(1), None))
    assert torch.equal(got, _linear(x.clone(), _pack(w.clone()), None, 64, chain))
    # and the two chains are two orders: they differ somewhere too
    other = _linear(x, _pack(w), None, 64, "fma" if chain == "dot" else "dot")
    assert not torch.equal(got, other)


def test_avx512_bf16_linear_rejects_bad_inputs() -> None:
    packed = _pack(torch.randn(40, 24).bfloat16())
    with pytest.raises(RuntimeError, match="bf16"):
        _linear(torch.randn(3, 24), packed, None, 40)  # fp32 x on a bf16 weight
    with pytest.raises(RuntimeError, match="K"):
        _linear(torch.randn(3, 40).bfloat16(), packed, None, 40)
    with pytest.raises(RuntimeError, match="n does not match"):
        _linear(torch.randn(3, 24).bfloat16(), packed, None, 70)
    with pytest.raises(RuntimeError, match="bias"):
        _linear(torch.randn(3, 24).bfloat16(), packed, torch.randn(39), 40)
    with pytest.raises(RuntimeError, match="packed weight"):
        _linear(torch.randn(3, 24).bfloat16(), packed.float(), None, 40)
    with pytest.raises(RuntimeError, match="chain must be"):
        _linear(torch.randn(3, 24).bfloat16(), packed, None, 40, "amx")
    with pytest.raises(RuntimeError, match="next must be a packed bf16 weight"):
        _linear(torch.randn(3, 24).bfloat16(), packed, None, 40, None, packed.float())
    assert _linear(torch.randn(0, 24).bfloat16(), packed, None, 40).shape == (0, 40)
    # A non-contiguous x is accepted (copied), with the same bits as its contiguous copy.
    x = torch.randn(24, 6).bfloat16().t()
    assert torch.equal(_linear(x, packed, None, 40), _linear(x.contiguous(), packed, None, 40))


def test_engine_on_the_avx512_kernel_is_batch_invariant(tiny_dirs: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    # What an AMD (no AMX) CPU runs, forced here: a bf16 engine whose linear layers take
    # this kernel gives a request the same bits alone (1 thread) as among 63 others
    # (2 threads, chunked prefill of 64 tokens).
    import random

    from tests.invariance_harness import Req, make_engine, random_prompt, run, sampled

    picked: list[str] = []

    def avx512() -> str:
        picked.append("avx512")
        return "avx512"

    monkeypatch.setattr(attention_cpu, "bf16_gemm_kernel", avx512)
    rng = random.Random(3)
    needle = Req("needle", random_prompt(rng, 37, 384), sampled(12345))
    others = [Req(f"o{i}", random_prompt(rng, rng.randint(1, 200), 384), sampled(i)) for i in range(63)]
    opts = {"num_kv_blocks": 1024, "dtype": "bfloat16"}
    want = run(make_engine(tiny_dirs["llama"], num_threads=1, **opts), [needle])["needle"]
    got = run(make_engine(tiny_dirs["llama"], num_threads=2, max_num_batched_tokens=64, **opts),
              others[:20] + [needle] + others[20:])["needle"]
    assert picked, "the engine never asked for the bf16 kernel"
    assert len(want.token_ids) > 0 and got == want
