"""The logprob contract's reductions over a vocabulary row, bitwise the same for a row
alone or in any batch, on any number of threads and on any device.

The normalizer of every log-softmax is `row_max_sum`: m = the row's max (0 where it is
not finite), s = the sum of contract_exp(x - m) in a fixed tree (halves of each chunk of
_CHUNK entries, then halves of the chunk sums over a power of two). contract_exp is
Cephes' expf written as single IEEE operations (no FMA, no library exp), so the torch
ops here give the same bits for the sum on CPU and CUDA, and the compiled CPU op
(kernels/csrc/row_reduce_cpu.cpp, used once the engine has loaded the CPU ops) gives
them too, ~3x faster than this torch twin (0.48 vs 1.51 ms on [64, 49152], AMD Zen 5):
torch's own exp is MKL's on x86 and differs between code paths and devices. Error of
contract_exp against float64: under 1 ulp over [-87, 88] (tests/test_row_reductions.py).

Importable without the engine: a trainer calls these on its own logits.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

# Vocabulary reductions run in chunks of this many entries (a power of two).
_CHUNK = 512

# Cephes' expf constants as their fp32 values, exact (the compiled op has the same hex).
_LOG2E = float.fromhex("0x1.715476p+0")
_LN2_HI = float.fromhex("0x1.63p-1")  # 0.693359375, 9 significant bits: n * _LN2_HI is exact
_LN2_LO = float.fromhex("-0x1.bd0106p-13")
_POLY = tuple(float.fromhex(h) for h in ("0x1.a0d2cep-13", "0x1.6e879cp-10", "0x1.11121p-7", "0x1.555382p-5",
                                        "0x1.555554p-3", "0x1p-1"))
_CPU_BLOCK = 1 << 19  # entries of x per block of rows the torch twin takes on CPU (2 MB)
_LOW, _HIGH = -87.0, 88.0  # below: 0 (weight < 2^-125); above: +inf (only rows without a finite max)


def contract_exp(t: torch.Tensor) -> torch.Tensor:
    """fp32 exp(t), elementwise, each step one rounded fp32 operation: t = n ln2 + r with
    n = round(t log2 e) (ties to even), ln2 split hi + lo; p = Cephes' degree-7 polynomial
    in r by Horner's rule; p 2^n. t < -87 gives 0, t > 88 gives +inf, NaN stays NaN."""
    op = _cpu_op("contract_exp", t)
    return op(t) if op is not None else _contract_exp_torch(t)


def _contract_exp_torch(t: torch.Tensor) -> torch.Tensor:
    # Written in place over three scratch tensors: on CPU each fresh [R, V] tensor costs
    # its page faults, more than the arithmetic.
    r = t.clamp(_LOW, _HIGH)
    n = torch.mul(r, _LOG2E).round_()
    scratch = torch.mul(n, _LN2_HI)
    r.sub_(scratch).sub_(torch.mul(n, _LN2_LO, out=scratch))
    p = torch.full_like(r, _POLY[0])
    for c in _POLY[1:]:
        p.mul_(r).add_(c)
    p.mul_(torch.mul(r, r, out=scratch)).add_(r).add_(1.0)
    two_n = scratch.view(torch.int32).copy_(n).add_(127).bitwise_left_shift_(23)  # 2^n from its bits
    p.mul_(two_n.view(torch.float32))
    p.masked_fill_(t > _HIGH, float("inf"))
    return p.masked_fill_(t < _LOW, 0.0)


def _halving_sum(a: torch.Tensor) -> torch.Tensor:
    """[..., W] (W a power of two) -> [...]: a[i] + a[i + W/2], repeated down to one."""
    while a.shape[-1] > 1:
        half = a.shape[-1] // 2
        a = a[..., :half] + a[..., half:]
    return a[..., 0]


def _row_max_sum_torch(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    rows, vocab = x.shape
    block = max(1, _CPU_BLOCK // max(vocab, 1))
    if x.device.type == "cpu" and rows > block:  # row blocks stay in cache: ~2x faster
        parts = [_row_max_sum_block(x[i : i + block]) for i in range(0, rows, block)]
        return torch.cat([m for m, _ in parts]), torch.cat([s for _, s in parts])
    return _row_max_sum_block(x)


def _row_max_sum_block(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    rows, vocab = x.shape
    m = x.amax(dim=-1, keepdim=True)  # exact, order-free; NaN anywhere gives NaN
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    pad = -vocab % _CHUNK
    shifted = torch.nn.functional.pad(x - m, (0, pad), value=float("-inf")) if pad else x - m
    chunk_sums = _halving_sum(_contract_exp_torch(shifted).view(rows, -1, _CHUNK))  # [R, C]
    chunks = chunk_sums.shape[1]
    padded = 1 << (chunks - 1).bit_length()
    if padded > chunks:
        chunk_sums = torch.nn.functional.pad(chunk_sums, (0, padded - chunks))
    return m, _halving_sum(chunk_sums)[:, None]


_compiled_ops: dict[str, object] = {}


def _compiled(name: str):
    """torch.ops.asyncengine_cpu.<name> once kernels.attention_cpu has loaded the ops, else None."""
    if name not in _compiled_ops:
        try:
            _compiled_ops[name] = getattr(torch.ops.asyncengine_cpu, name)
        except (AttributeError, RuntimeError):
            return None
    return _compiled_ops[name]


def _cpu_op(name: str, x: torch.Tensor):
    """The compiled op `name` for a CPU fp32 x once the ops are loaded, else None."""
    return _compiled(name) if x.device.type == "cpu" and x.dtype == torch.float32 else None


def _logsumexp(m: torch.Tensor, total: torch.Tensor) -> torch.Tensor:
    """row_max_sum's (m [R, 1], total [R, 1]) -> [R]."""
    return (m + torch.log(total))[:, 0]


def row_max_sum(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[R, V] fp32 -> (max [R, 1] (0 where not finite), sum of contract_exp(x - max) [R, 1])."""
    op = _cpu_op("row_stats", x)
    if op is None:
        return _row_max_sum_torch(x)
    m, s, _, _ = op(x, True)
    return m, s


def row_logsumexp(x: torch.Tensor) -> torch.Tensor:
    """[R, V] -> [R] logsumexp per row, batch- and thread-invariant. -inf entries are fine."""
    return _logsumexp(*row_max_sum(x))


class RowStats(NamedTuple):
    """What a plain sampling step reads of its [R, V] logits, each exactly the function's."""

    lse: torch.Tensor     # [R] row_logsumexp
    argmax: torch.Tensor  # [R] int64, row_argmax
    finite: torch.Tensor  # [R] bool, rows_finite


def row_stats(x: torch.Tensor) -> RowStats:
    """All three from one compiled call (one read of each row for the scan, one from L2 for
    the sum): a decode step's non-finite check, normalizer and greedy tokens."""
    op = _cpu_op("row_stats", x)
    if op is None:
        return RowStats(row_logsumexp(x), _row_argmax_torch(x), torch.isfinite(x).all(dim=-1))
    m, total, idx, finite = op(x, True)
    return RowStats(_logsumexp(m, total), idx, finite)


def rows_finite(x: torch.Tensor) -> torch.Tensor:
    """[R, V] -> [R] bool: every entry of the row is finite (no NaN, no +-inf)."""
    op = _cpu_op("row_stats", x)
    if op is None:
        return torch.isfinite(x).all(dim=-1)
    return op(x, False)[3]


def row_argmax(x: torch.Tensor) -> torch.Tensor:
    """[R, V] -> [R] int64: each row's first maximum, exactly torch.argmax(x, -1) (NaN
    counts as the maximum). Found chunk by chunk, as vectorized maxima, then one chunk's
    argmax: torch's CPU argmax over a vocabulary is a scalar loop (3.9 ms vs 0.6 ms on
    [64, 49152] here); the compiled op, one read of the row."""
    op = _cpu_op("row_stats", x)
    return op(x, False)[2] if op is not None else _row_argmax_torch(x)


def _row_argmax_torch(x: torch.Tensor) -> torch.Tensor:
    rows, vocab = x.shape
    full = vocab // _CHUNK * _CHUNK
    if full == 0 or rows == 0:
        return torch.argmax(x, dim=-1)
    chunk_max = x[:, :full].reshape(rows, -1, _CHUNK).amax(dim=-1)  # [R, V // CHUNK]
    if full < vocab:
        chunk_max = torch.cat([chunk_max, x[:, full:].amax(dim=-1, keepdim=True)], dim=1)
    best = chunk_max.amax(dim=-1, keepdim=True)  # [R, 1]
    if bool(torch.isnan(best).any()):
        return torch.argmax(x, dim=-1)  # amax propagates NaN; the first NaN is what argmax returns
    start = (chunk_max == best).to(torch.uint8).argmax(dim=-1) * _CHUNK  # [R] first chunk with the max
    # A short last chunk repeats the last index: copies after it never change the first max.
    idx = (start[:, None] + torch.arange(_CHUNK, device=x.device)).clamp_max_(vocab - 1)  # [R, CHUNK]
    return start + x.gather(1, idx).argmax(dim=-1)


def row_log_softmax(x: torch.Tensor) -> torch.Tensor:
    """[R, V] log-softmax per row with the invariant normalizer above."""
    return x - row_logsumexp(x)[:, None]
