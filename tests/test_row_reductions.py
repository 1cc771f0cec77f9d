"""The contract's vocabulary reductions (asyncengine/row_reductions.py): contract_exp is
accurate, and the compiled CPU op (kernels/csrc/row_reduce_cpu.cpp) gives the pure torch
twin's bits on every kind of row, alone or in any batch, on any thread count."""
from __future__ import annotations

import pytest
import torch

from asyncengine import row_reductions as R
from kernels import attention_cpu
from tests.cuda_support import CUDA
from tests.invariance_harness import rows_invariant

INF, NAN = float("inf"), float("nan")
needs_ops = pytest.mark.skipif(not attention_cpu.available(), reason="the compiled CPU ops do not build here")


def _ulps(y: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """|y - ref| in units of the fp32 spacing at ref (float64 ref, finite)."""
    f = ref.float()
    spacing = (torch.nextafter(f, torch.full_like(f, INF)) - f).double()
    return (y.double() - ref).abs() / spacing


def test_contract_exp_is_within_one_ulp_of_float64_over_its_range() -> None:
    t = torch.linspace(-87.0, 88.0, 4_000_001)
    ref = torch.exp(t.double())
    finite = torch.isfinite(ref.float())
    assert float(_ulps(R.contract_exp(t)[finite], ref[finite]).max()) < 1.0
    # Near 0, where the largest terms of every softmax live, on a finer grid.
    t = torch.linspace(-2.0, 0.0, 2_000_001)
    assert float(_ulps(R.contract_exp(t), torch.exp(t.double())).max()) < 1.0


def test_contract_exp_ends_and_special_values() -> None:
    t = torch.tensor([0.0, -0.0, -87.0, -87.01, -100.0, -INF, 88.0, 88.01, INF, NAN])
    y = R.contract_exp(t)
    assert y[0] == 1.0 and y[1] == 1.0  # the row's max weighs exactly 1
    assert 0 < y[2] < 2e-38 and y[3] == 0 and y[4] == 0 and y[5] == 0
    assert 1e38 < y[6] < INF and y[7] == INF and y[8] == INF
    assert torch.isnan(y[9])


def _rows(vocab: int, seed: int) -> torch.Tensor:
    """Rows of every kind: plain at three scales, masked (-inf), all -inf, one +inf, one NaN,
    ties, one huge, two NaNs, one -inf, a repeated max."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(12, vocab, generator=g)
    x[1] *= 10
    x[2] *= 40
    x[3, torch.rand(vocab, generator=g) < 0.7] = -INF
    x[4] = -INF
    x[5, vocab // 2] = INF
    x[6, vocab // 3] = NAN
    x[7] = x[7].round()  # ties
    x[8, 0] = 1e4  # every other entry far below: their weights flush to 0
    x[9, [vocab - 1, vocab // 2]] = NAN  # two NaNs, the first in the tail when vocab % 16
    x[10, vocab - 1] = -INF  # finite max, one -inf: not finite
    x[11, [0, vocab - 1]] = 50.0  # the max twice: the first is argmax
    return x


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(torch.isnan(a), torch.isnan(b)) and torch.equal(a.nan_to_num(0.0), b.nan_to_num(0.0))


def _op(x: torch.Tensor, with_sum: bool = True) -> tuple[torch.Tensor, ...]:
    return torch.ops.asyncengine_cpu.row_stats(x, with_sum)


@needs_ops
@pytest.mark.parametrize("vocab", [1, 15, 16, 17, 511, 512, 513, 1000, 3 * 512 + 7, 49152])
def test_compiled_op_is_the_torch_twins_bitwise(vocab: int) -> None:
    x = _rows(vocab, vocab)
    m, s, idx, finite = _op(x)
    tm, ts = R._row_max_sum_torch(x)
    assert _same(m, tm) and _same(s, ts), vocab
    assert torch.equal(idx, torch.argmax(x, dim=-1)), vocab  # NaN first, then the first max
    assert torch.equal(finite, torch.isfinite(x).all(dim=-1)), vocab
    m2, s2, idx2, finite2 = _op(x, with_sum=False)  # the scan alone: the same, no sum
    assert _same(m2, m) and torch.equal(idx2, idx) and torch.equal(finite2, finite) and not s2.any()
    # Once loaded, the entry points take the op.
    assert R._compiled("row_stats") is not None
    stats = R.row_stats(x)
    assert _same(stats.lse, R.row_logsumexp(x)) and torch.equal(stats.argmax, idx) and torch.equal(stats.finite, finite)
    assert torch.equal(R.row_argmax(x), idx) and torch.equal(R.rows_finite(x), finite)


def test_torch_twins_of_argmax_and_finite() -> None:
    """What a trainer or the torch backend runs without the compiled op."""
    for vocab in (7, 1000, 1543):
        x = _rows(vocab, 4)
        assert torch.equal(R._row_argmax_torch(x), torch.argmax(x, dim=-1)), vocab
    ops = dict(R._compiled_ops)
    try:  # as a trainer without the engine's ops runs it
        R._compiled_ops.update(row_stats=None)
        stats = R.row_stats(x)
        assert _same(stats.lse, (lambda m, s: (m + torch.log(s))[:, 0])(*R._row_max_sum_torch(x)))
        assert torch.equal(stats.argmax, torch.argmax(x, dim=-1))
        assert torch.equal(stats.finite, torch.isfinite(x).all(dim=-1))
    finally:
        R._compiled_ops.clear()
        R._compiled_ops.update(ops)


@needs_ops
def test_compiled_exp_is_the_torch_twin_entry_by_entry() -> None:
    g = torch.Generator().manual_seed(2)
    t = torch.cat([torch.linspace(-90.0, 90.0, 3_000_001), torch.randn(100_003, generator=g) * 20,
                   torch.tensor([0.0, -0.0, -INF, INF, NAN])])
    y = torch.ops.asyncengine_cpu.contract_exp(t)
    assert _same(y, R._contract_exp_torch(t))
    assert _same(R.contract_exp(t), y)  # the entry point takes the op once it is loaded
    strided = t[: 1000 * 3000].view(1000, 3000)[:, 1:7]  # a non-contiguous view: its copy's bits
    assert _same(torch.ops.asyncengine_cpu.contract_exp(strided), R._contract_exp_torch(strided.clone()))


@needs_ops
def test_compiled_op_is_row_invariant_and_the_twin_in_row_blocks() -> None:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(40, 49152, generator=g) * 8  # 40 rows: the twin runs in blocks of 10
    assert rows_invariant(lambda r: torch.cat(_op(r)[:2], dim=1), x)
    m, s, _, _ = _op(x)
    tm, ts = R._row_max_sum_torch(x)
    assert torch.equal(m, tm) and torch.equal(s, ts)
    # A non-contiguous view gives its contiguous copy's bits.
    assert torch.equal(_op(x[:, ::2])[1], R._row_max_sum_torch(x[:, ::2].clone())[1])


def test_logsumexp_is_close_to_float64_and_handles_degenerate_rows() -> None:
    x = _rows(49152, 3)
    lse = R.row_logsumexp(x)
    ref = torch.logsumexp(x.double(), dim=-1)
    plain = [0, 1, 2, 3, 7, 8]
    assert torch.allclose(lse[plain].double(), ref[plain], rtol=2e-7, atol=2e-6)
    assert lse[4] == -INF and lse[5] == INF and torch.isnan(lse[6])


def test_logsumexp_is_one_twin_with_or_without_the_compiled_op() -> None:
    """The bits a trainer gets from the pure torch path are the engine's (op loaded or not)."""
    x = _rows(1000, 5)
    assert _same(R.row_logsumexp(x), (lambda m, s: (m + torch.log(s))[:, 0])(*R._row_max_sum_torch(x)))


@pytest.mark.parametrize("device", [pytest.param("cuda", marks=CUDA)])
def test_the_twin_gives_the_cpu_bits_on_cuda(device: str) -> None:
    """Every step of contract_exp and of the sum tree is one IEEE operation, so CUDA's
    torch gives the CPU's bits (scripts/gpu_check.sh runs this on a GPU)."""
    t = torch.cat([torch.linspace(-90.0, 90.0, 1_000_001), torch.tensor([0.0, -0.0, -INF, INF, NAN])])
    assert _same(R._contract_exp_torch(t.to(device)).cpu(), R._contract_exp_torch(t))
    x = _rows(49152, 7)
    m, s = R._row_max_sum_torch(x.to(device))
    tm, ts = R._row_max_sum_torch(x)
    assert _same(m.cpu(), tm) and _same(s.cpu(), ts)
