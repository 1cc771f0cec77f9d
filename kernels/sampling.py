"""Sampling support: fp32 log_softmax + chosen-token gather + top-N, and the top-k /
top-p / min-p support mask, with the semantics of `asyncengine.logprobs` (the tests
check the torch references here against it): ties always go to the lower token id.

The Triton kernels run one program per row over the vocabulary in fixed tiles of
VOCAB_TILE, so a row's result never depends on the batch. They order tokens by one
integer key, (value, -token id), so "largest value, lower id first" is a plain integer
comparison, and find top-k / top-p thresholds by binary search on that key (a pass
over the row per step) instead of sorting the vocabulary.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from asyncengine.logprobs import row_log_softmax

VOCAB_TILE = 2048  # vocabulary elements per loop step of one program


class LogprobsOut(NamedTuple):
    logprobs: torch.Tensor  # [R, V] fp32: log_softmax over the row (over the mask if given)
    chosen: torch.Tensor  # [R] fp32: logprobs[r, token_ids[r]]
    top_ids: torch.Tensor  # [R, N] int64: the N largest, by value desc then token id asc
    top_values: torch.Tensor  # [R, N] fp32


def log_softmax_topn_torch(
    logits: torch.Tensor, token_ids: torch.Tensor, num_top: int, mask: torch.Tensor | None = None
) -> LogprobsOut:
    """logits: [R, V] fp32; token_ids: [R] int64; mask: [R, V] bool support (None = all).
    The masked form is `processed_log_probs`, the unmasked one `raw_log_probs`."""
    z = logits.float() if mask is None else logits.float().masked_fill(~mask, float("-inf"))
    log_p = row_log_softmax(z)  # [R, V], the contract's batch-invariant normalizer
    chosen = log_p.gather(1, token_ids.long()[:, None])[:, 0]
    n = min(num_top, log_p.shape[1])
    # topk on the (value, -token id) key: exact ties go to the lower id, without a sort.
    ids = torch.topk(order_keys(log_p), n, dim=-1).indices  # [R, n], value desc then id asc
    return LogprobsOut(log_p, chosen, ids, log_p.gather(1, ids))


def order_keys(x: torch.Tensor) -> torch.Tensor:
    """[R, V] fp32 -> [R, V] int64 keys ordered by value, then by lower token id (the
    Triton kernels' _sort_key): the fp32 bits made monotone, then the id bits below."""
    bits = (x + 0.0).view(torch.int32)  # + 0.0 makes -0.0 equal to +0.0
    ordered = torch.where(bits >= 0, bits, bits ^ 0x7FFFFFFF).to(torch.int64)
    id_bits = max(1, (x.shape[1] - 1).bit_length())
    ids = torch.arange(x.shape[1], device=x.device)
    return ordered * (1 << id_bits) + ((1 << id_bits) - 1 - ids)


def support_mask_torch(
    scaled: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, min_p: torch.Tensor
) -> torch.Tensor:
    """scaled: [R, V] fp32 z' (penalized, tempered) -> [R, V] bool, kept by top-k, then
    top-p, then min-p. top_k: [R] int (<= 0 or >= V: off); top_p: [R] in (0, 1] (1: off);
    min_p: [R] in [0, 1] (0: off); pass float64 to keep the request's exact floats.
    This is `asyncengine.logprobs.support_mask` with per-row tensors."""
    from asyncengine.logprobs import support_mask
    from asyncengine.sampling_params import SamplingParams

    vocab = scaled.shape[1]
    params = [SamplingParams(top_k=k if 0 < k < vocab else 0, top_p=p, min_p=mp)
              for k, p, mp in zip(top_k.tolist(), top_p.tolist(), min_p.tolist())]
    return support_mask(scaled, params)


# --- Triton -------------------------------------------------------------------------
try:  # the CPU engine runs without Triton; only the launchers below need it
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only where Triton is absent
    triton = None

if triton is not None:

    @triton.jit
    def _sort_key(x, ids, ID_BITS: tl.constexpr):
        # fp32 -> int32 with the same order (flip the magnitude bits of negatives), then
        # (ordered << ID_BITS) + (2^ID_BITS - 1 - id): larger key = larger value, then lower id.
        bits = (x + 0.0).to(tl.int32, bitcast=True)  # + 0.0 makes -0.0 equal to +0.0
        ordered = tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF).to(tl.int64)
        return ordered * (1 << ID_BITS) + ((1 << ID_BITS) - 1 - ids.to(tl.int64))

    @triton.jit
    def _key_value(key, ID_BITS: tl.constexpr):
        ordered = (key >> ID_BITS).to(tl.int32)
        return tl.where(ordered >= 0, ordered, ordered ^ 0x7FFFFFFF).to(tl.float32, bitcast=True)

    @triton.jit
    def _row_max_lse(row_ptr, mask_ptr, vocab, HAS_MASK: tl.constexpr, BLOCK_V: tl.constexpr):
        # Online max and sum of exp over fixed tiles: (max, sum exp(x - max)) of the row.
        m = tl.max(tl.full([BLOCK_V], float("-inf"), tl.float32), axis=0)
        s = tl.sum(tl.zeros([BLOCK_V], tl.float32), axis=0)
        for start in range(0, vocab, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            x = tl.load(row_ptr + cols, mask=cols < vocab, other=float("-inf"))
            if HAS_MASK:
                x = tl.where(tl.load(mask_ptr + cols, mask=cols < vocab, other=0) != 0, x, float("-inf"))
            m_new = tl.maximum(m, tl.max(x, axis=0))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            s = s * tl.exp(m - m_safe) + tl.sum(tl.exp(x - m_safe), axis=0)
            m = m_new
        return m, s

    @triton.jit
    def _merge_top(best, keys, N: tl.constexpr, N_PAD: tl.constexpr, SENTINEL):
        # The N largest of best [N_PAD] and keys [BLOCK_V], descending; keys are unique.
        merged = tl.full([N_PAD], 0, tl.int64) + SENTINEL
        slots = tl.arange(0, N_PAD)
        for j in tl.static_range(N):
            c = tl.maximum(tl.max(keys, axis=0), tl.max(best, axis=0))
            merged = tl.where(slots == j, c, merged)
            keys = tl.where(keys == c, SENTINEL, keys)
            best = tl.where(best == c, SENTINEL, best)
        return merged

    @triton.jit
    def _log_softmax_topn_kernel(
        logits_ptr, mask_ptr, ids_ptr, out_ptr, chosen_ptr, top_ids_ptr, top_vals_ptr,
        vocab, stride_row, HAS_MASK: tl.constexpr, N: tl.constexpr, N_PAD: tl.constexpr,
        ID_BITS: tl.constexpr, BLOCK_V: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        row_ptr, mrow_ptr = logits_ptr + row * stride_row, mask_ptr + row * vocab
        m, s = _row_max_lse(row_ptr, mrow_ptr, vocab, HAS_MASK, BLOCK_V)
        log_s = tl.log(s)
        sentinel = tl.full([], -(1 << 31) - 1, tl.int64) * (1 << ID_BITS)  # below every key
        best = tl.full([N_PAD], 0, tl.int64) + sentinel
        for start in range(0, vocab, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            ok = cols < vocab
            x = tl.load(row_ptr + cols, mask=ok, other=float("-inf"))
            if HAS_MASK:
                x = tl.where(tl.load(mrow_ptr + cols, mask=ok, other=0) != 0, x, float("-inf"))
            lp = (x - m) - log_s  # the operation order of torch's log_softmax
            tl.store(out_ptr + row * vocab + cols, lp, mask=ok)
            if N > 0:
                keys = tl.where(ok, _sort_key(lp, cols, ID_BITS), sentinel)
                nth = tl.min(tl.where(tl.arange(0, N_PAD) < N, best, -sentinel), axis=0)
                if tl.max(keys, axis=0) > nth:  # most tiles hold nothing new once best is full
                    best = _merge_top(best, keys, N, N_PAD, sentinel)
        token = tl.load(ids_ptr + row)
        x_t = tl.load(row_ptr + token)
        if HAS_MASK:
            x_t = tl.where(tl.load(mrow_ptr + token) != 0, x_t, float("-inf"))
        tl.store(chosen_ptr + row, (x_t - m) - log_s)
        if N > 0:
            slots = tl.arange(0, N_PAD)
            top_ids = (1 << ID_BITS) - 1 - (best & ((1 << ID_BITS) - 1))
            tl.store(top_ids_ptr + row * N + slots, top_ids, mask=slots < N)
            tl.store(top_vals_ptr + row * N + slots, _key_value(best, ID_BITS), mask=slots < N)


def log_softmax_topn_triton(
    logits: torch.Tensor, token_ids: torch.Tensor, num_top: int, mask: torch.Tensor | None = None
) -> LogprobsOut:
    """Same contract as log_softmax_topn_torch; one program per row."""
    if triton is None:
        raise RuntimeError("log_softmax_topn_triton needs the `triton` package")
    rows, vocab = logits.shape
    if logits.dtype != torch.float32 or logits.stride(1) != 1:
        raise ValueError("logits must be fp32 with contiguous rows")
    if mask is not None and (mask.shape != logits.shape or mask.dtype != torch.bool):
        raise ValueError("mask must be a bool tensor shaped like logits")
    n = min(num_top, vocab)
    out = torch.empty(rows, vocab, dtype=torch.float32, device=logits.device)
    chosen = torch.empty(rows, dtype=torch.float32, device=logits.device)
    top_ids = torch.empty(rows, n, dtype=torch.int64, device=logits.device)
    top_vals = torch.empty(rows, n, dtype=torch.float32, device=logits.device)
    if rows == 0:
        return LogprobsOut(out, chosen, top_ids, top_vals)
    mask_arg = mask.contiguous().view(torch.uint8) if mask is not None else out
    _log_softmax_topn_kernel[(rows,)](
        logits, mask_arg, token_ids.to(torch.int64).contiguous(), out, chosen, top_ids, top_vals,
        vocab, logits.stride(0), HAS_MASK=mask is not None, N=n, N_PAD=max(2, triton.next_power_of_2(n)),
        ID_BITS=max(1, (vocab - 1).bit_length()), BLOCK_V=VOCAB_TILE,
    )
    return LogprobsOut(out, chosen, top_ids, top_vals)


# Support mask: binary searches on the key, each step one pass over the row's tiles
# (about 32 + log2(V) steps per threshold on a GPU-resident row; no vocabulary sort).
if triton is not None:

    @triton.jit
    def _load_keys(row_ptr, start, vocab, ID_BITS: tl.constexpr, BLOCK_V: tl.constexpr):
        cols = start + tl.arange(0, BLOCK_V)
        ok = cols < vocab
        x = tl.load(row_ptr + cols, mask=ok, other=float("-inf"))
        return cols, ok, x, _sort_key(x, cols, ID_BITS)

    @triton.jit
    def _row_stats(row_ptr, vocab, ID_BITS: tl.constexpr, BLOCK_V: tl.constexpr):
        # (smallest key, largest key, max value) of the row.
        big = tl.full([BLOCK_V], 1 << 62, tl.int64)
        lo = tl.min(big, axis=0)
        hi = -lo
        m = tl.max(tl.full([BLOCK_V], float("-inf"), tl.float32), axis=0)
        for start in range(0, vocab, BLOCK_V):
            cols, ok, x, keys = _load_keys(row_ptr, start, vocab, ID_BITS, BLOCK_V)
            lo = tl.minimum(lo, tl.min(tl.where(ok, keys, big), axis=0))
            hi = tl.maximum(hi, tl.max(tl.where(ok, keys, -big), axis=0))
            m = tl.maximum(m, tl.max(x, axis=0))
        return lo, hi, m

    @triton.jit
    def _count_at_least(row_ptr, vocab, c, ID_BITS: tl.constexpr, BLOCK_V: tl.constexpr):
        n = tl.sum(tl.zeros([BLOCK_V], tl.int32), axis=0)
        for start in range(0, vocab, BLOCK_V):
            cols, ok, x, keys = _load_keys(row_ptr, start, vocab, ID_BITS, BLOCK_V)
            n += tl.sum((ok & (keys >= c)).to(tl.int32), axis=0)
        return n

    @triton.jit
    def _sum_exp(row_ptr, vocab, c, m, ID_BITS: tl.constexpr, BLOCK_V: tl.constexpr):
        # sum of exp(x - m) over keys >= c, fp32 in tile order (softmax's denominator).
        z = tl.sum(tl.zeros([BLOCK_V], tl.float32), axis=0)
        for start in range(0, vocab, BLOCK_V):
            cols, ok, x, keys = _load_keys(row_ptr, start, vocab, ID_BITS, BLOCK_V)
            z += tl.sum(tl.where(ok & (keys >= c), tl.exp(x - m), 0.0), axis=0)
        return z

    @triton.jit
    def _mass_above(row_ptr, vocab, c, m, z, ID_BITS: tl.constexpr, BLOCK_V: tl.constexpr):
        # Probability mass of keys > c. Like the reference (fp32 probabilities summed by a
        # float64 cumsum, then compared in fp32), so that only near-exact ties can differ.
        mass = tl.sum(tl.zeros([BLOCK_V], tl.float64), axis=0)
        for start in range(0, vocab, BLOCK_V):
            cols, ok, x, keys = _load_keys(row_ptr, start, vocab, ID_BITS, BLOCK_V)
            p = tl.exp(x - m) / z
            mass += tl.sum(tl.where(ok & (keys > c), p.to(tl.float64), 0.0), axis=0)
        return mass.to(tl.float32)

    @triton.jit
    def _support_mask_kernel(
        scaled_ptr, top_k_ptr, top_p_ptr, log_min_p_ptr, mask_ptr, vocab, stride_row,
        ID_BITS: tl.constexpr, BLOCK_V: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        row_ptr = scaled_ptr + row * stride_row
        top_k = tl.load(top_k_ptr + row)
        top_p = tl.load(top_p_ptr + row)
        lo, hi, m = _row_stats(row_ptr, vocab, ID_BITS, BLOCK_V)
        if (top_k > 0) & (top_k < vocab):  # the k-th largest key: largest c with >= k keys >= c
            b = hi
            while lo < b:
                mid = lo + (b - lo + 1) // 2
                if _count_at_least(row_ptr, vocab, mid, ID_BITS, BLOCK_V) >= top_k:
                    lo = mid
                else:
                    b = mid - 1
        if top_p < 1.0:  # smallest c with mass above c < top_p; the mass only falls with c
            z = _sum_exp(row_ptr, vocab, lo, m, ID_BITS, BLOCK_V)
            b = hi
            while lo < b:
                mid = lo + (b - lo) // 2
                if _mass_above(row_ptr, vocab, mid, m, z, ID_BITS, BLOCK_V) < top_p:
                    b = mid
                else:
                    lo = mid + 1
        log_min_p = tl.load(log_min_p_ptr + row)
        for start in range(0, vocab, BLOCK_V):
            cols, ok, x, keys = _load_keys(row_ptr, start, vocab, ID_BITS, BLOCK_V)
            keep = (keys >= lo) & ((x - m) >= log_min_p)
            tl.store(mask_ptr + row * vocab + cols, keep.to(tl.int8), mask=ok)


def support_mask_triton(
    scaled: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, min_p: torch.Tensor
) -> torch.Tensor:
    """Same contract as support_mask_torch; one program per row, no sort."""
    if triton is None:
        raise RuntimeError("support_mask_triton needs the `triton` package")
    rows, vocab = scaled.shape
    if scaled.dtype != torch.float32 or scaled.stride(1) != 1:
        raise ValueError("scaled logits must be fp32 with contiguous rows")
    mask = torch.empty(rows, vocab, dtype=torch.int8, device=scaled.device)
    if rows == 0:
        return mask.bool()
    # log(min_p) in float64, then fp32: what the reference's fp32 comparison sees.
    log_min_p = torch.log(min_p.double()).float().contiguous()  # [R], -inf when off
    _support_mask_kernel[(rows,)](
        scaled, top_k.to(torch.int64).contiguous(), top_p.float().contiguous(), log_min_p, mask,
        vocab, scaled.stride(0), ID_BITS=max(1, (vocab - 1).bit_length()), BLOCK_V=VOCAB_TILE,
    )
    return mask.view(torch.bool)
