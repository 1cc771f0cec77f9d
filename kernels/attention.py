"""Paged attention over block tables for a mixed batch (prefill chunks and decodes).

The torch path is the CPU engine's implementation and the reference for the Triton
kernel. It is written to be batch-invariant: a query row's output does not depend on
which other rows or sequences share the call.
- keys are reduced in fixed tiles of KEY_TILE aligned to absolute position 0, and the
  per-tile partial sums are added in tile order, so keys padded past a sequence's end
  (or past a query's causal limit) only ever add exact zeros;
- matmul heights are padded to at least MIN_ROWS, because CPU GEMM libraries switch to
  different small-M kernels (with a different rounding) below that.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

KEY_TILE = 64
MIN_ROWS = 16


@dataclass(slots=True)
class AttentionMetadata:
    """Where each sequence's queries and keys are; built once per step by the model runner."""

    # [S + 1] int64: query rows of sequence s are query_start_loc[s]:query_start_loc[s+1].
    query_start_loc: torch.Tensor
    # [S] int64: keys of sequence s after this step (cached + new).
    seq_lens: torch.Tensor
    # [S, max_blocks] int64: KV block ids of each sequence, padded with 0.
    block_tables: torch.Tensor
    # [T] int64: cache slot written by each new token.
    slot_mapping: torch.Tensor
    # [T] int64: absolute position of each new token.
    positions: torch.Tensor
    # Python copies of query_start_loc and seq_lens (the torch path groups on them).
    query_start_loc_list: list[int]
    seq_lens_list: list[int]
    # Per-step tensors the torch path derives once and reuses in every layer.
    derived: dict[tuple[int, ...], tuple[torch.Tensor, ...]] = field(default_factory=dict)


def paged_attention_torch(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:
    """q: [T, Hq, D]; k_cache, v_cache: [num_blocks, block_size, Hkv, D] -> [T, Hq, D].

    Query i of sequence s sits at absolute position seq_len - q_len + i and attends keys
    0..position (causal over the cached prefix and its own chunk). Math in fp32.
    """
    out = torch.empty(q.shape, dtype=torch.float32, device=q.device)
    for seqs in _groups(meta):
        _attend_group(q, k_cache, v_cache, meta, seqs, scale, out)
    return out.to(q.dtype)


def _groups(meta: AttentionMetadata) -> list[list[int]]:
    """Decodes (one query) share one batched call; each longer chunk gets its own, so
    no sequence's queries are padded to another's length."""
    qsl = meta.query_start_loc_list
    decodes = [s for s in range(len(qsl) - 1) if qsl[s + 1] - qsl[s] == 1]
    chunks = [[s] for s in range(len(qsl) - 1) if qsl[s + 1] - qsl[s] > 1]
    return ([decodes] if decodes else []) + chunks


def _attend_group(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    seqs: list[int],
    scale: float,
    out: torch.Tensor,
) -> None:
    num_heads, head_dim = q.shape[1], q.shape[2]
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = num_heads // num_kv_heads
    n, q_len = len(seqs), meta.query_start_loc_list[seqs[0] + 1] - meta.query_start_loc_list[seqs[0]]
    key = tuple(seqs)
    if key not in meta.derived:
        meta.derived[key] = _group_tensors(meta, seqs, max(KEY_TILE, block_size), block_size, group)
    tables, rows_idx, blocked, past_end, shortest = meta.derived[key]
    num_keys = blocked.shape[-1]

    # Keys/values as [Hkv, n, L, D] fp32: one block gather, one layout copy; tiles are views.
    k = _gather(k_cache, tables).view(num_kv_heads, n, num_keys, head_dim).float()
    v = _gather(v_cache, tables).view(num_kv_heads, n, num_keys, head_dim).float()
    # Slots past a sequence's end hold whatever an earlier user of the block left there;
    # a stale inf/NaN would survive p = 0 (0 * inf = NaN), so zero them (v is a gathered
    # copy, never the cache): exact otherwise, and a no-op when no slot is past an end.
    if past_end is not None:
        v[:, :, shortest:].masked_fill_(past_end[None, :, :, None], 0.0)

    # Queries as rows (g, i) per KV head: [Hkv, n, rows, D], rows = G * q_len; the
    # matmuls see rows padded to MIN_ROWS, the elementwise work only the real ones.
    rows = group * q_len
    qg = q.index_select(0, rows_idx).float().view(n, q_len, num_kv_heads, group, head_dim)
    qg = _pad_rows(qg.permute(2, 0, 3, 1, 4).reshape(num_kv_heads, n, rows, head_dim))
    scores = torch.matmul(qg, k.transpose(-1, -2))[:, :, :rows] * scale  # [Hkv, n, rows, L]
    scores.masked_fill_(blocked[None], float("-inf"))
    probs = torch.exp(scores - scores.amax(-1, keepdim=True))  # [Hkv, n, rows, L]

    # Per-tile partial numerators/denominators, then a sum in tile order.
    num_tiles = num_keys // KEY_TILE
    p_tiles = probs.view(num_kv_heads, n, rows, num_tiles, KEY_TILE).transpose(2, 3)  # [Hkv, n, t, rows, KT]
    den_tiles = p_tiles.sum(-1, keepdim=True)  # [Hkv, n, t, rows, 1]
    partial = torch.matmul(_pad_rows(p_tiles), v.view(num_kv_heads, n, num_tiles, KEY_TILE, head_dim))
    acc, den = partial[:, :, 0], den_tiles[:, :, 0]
    for t in range(1, num_tiles):
        acc = acc + partial[:, :, t]
        den = den + den_tiles[:, :, t]
    res = acc[:, :, :rows] / den  # [Hkv, n, G * q_len, D]
    res = res.view(num_kv_heads, n, group, q_len, head_dim).permute(1, 3, 0, 2, 4)
    out.index_copy_(0, rows_idx, res.reshape(n * q_len, num_heads, head_dim))


def _group_tensors(
    meta: AttentionMetadata, seqs: list[int], tile: int, block_size: int, group: int
) -> tuple[torch.Tensor, ...]:
    """Block tables [n, L / BS], query row ids [n * q_len], the causal "blocked" mask
    [n, rows, L] and
    the past-the-end mask of a group: the same in every layer of a step."""
    qsl, lens = meta.query_start_loc_list, meta.seq_lens_list
    dev = meta.seq_lens.device
    q_len = qsl[seqs[0] + 1] - qsl[seqs[0]]
    num_keys = -(-max(lens[s] for s in seqs) // tile) * tile  # padded to whole tiles
    seq_idx = torch.tensor(seqs, dtype=torch.int64, device=dev)
    tables = _pad_columns(meta.block_tables.index_select(0, seq_idx)[:, : num_keys // block_size],
                          num_keys // block_size)
    rows_idx = torch.cat([torch.arange(qsl[s], qsl[s] + q_len, device=dev) for s in seqs])
    seq_lens = meta.seq_lens.index_select(0, seq_idx)  # [n]
    key_pos = torch.arange(num_keys, device=dev)
    q_pos = seq_lens[:, None] - q_len + torch.arange(q_len, device=dev)[None, :]  # [n, q_len]
    blocked = (key_pos[None, None, :] > q_pos[:, :, None]).repeat(1, group, 1)  # [n, rows, L]
    shortest = min(lens[s] for s in seqs)
    past_end = key_pos[None, shortest:] >= seq_lens[:, None] if shortest < num_keys else None
    return tables, rows_idx, blocked, past_end, shortest


def head_major_cache(num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int,
                     dtype: torch.dtype, device: str | torch.device = "cpu") -> torch.Tensor:
    """A zeroed KV cache stored as [Hkv, NB, BS, D] and returned as the [NB, BS, Hkv, D]
    view every op expects. The torch path then gathers a sequence's keys per head as
    whole 4 KB blocks, already in the [Hkv, n, L, D] order the matmuls want."""
    phys = torch.zeros(num_kv_heads, num_blocks, block_size, head_dim, dtype=dtype, device=device)
    return phys.permute(1, 2, 0, 3)


def _gather(cache: torch.Tensor, tables: torch.Tensor) -> torch.Tensor:
    """cache [NB, BS, Hkv, D], tables [n, nb] -> [Hkv, n * nb, BS, D] (contiguous)."""
    num_blocks, block_size, num_kv_heads, head_dim = cache.shape
    phys = cache.permute(2, 0, 1, 3)  # [Hkv, NB, BS, D]
    if phys.is_contiguous():  # head-major storage: one gather, no layout copy
        return phys.index_select(1, tables.reshape(-1))
    # Block-major storage: gather whole blocks as rows, then one copy fixes the layout.
    blocks = cache.reshape(num_blocks, -1).index_select(0, tables.reshape(-1))
    return blocks.view(-1, block_size, num_kv_heads, head_dim).permute(2, 0, 1, 3).contiguous()


def _pad_rows(x: torch.Tensor) -> torch.Tensor:
    """Pad the matmul height (dim -2) up to MIN_ROWS with zero rows."""
    rows = x.shape[-2]
    return torch.nn.functional.pad(x, (0, 0, 0, MIN_ROWS - rows)) if rows < MIN_ROWS else x


def _pad_columns(tables: torch.Tensor, width: int) -> torch.Tensor:
    if tables.shape[1] >= width:
        return tables
    return torch.nn.functional.pad(tables, (0, width - tables.shape[1]))


# --- Triton -------------------------------------------------------------------------
# One launch for the mixed batch. Program (b, kv_head) takes query block b -- the query
# tokens of one sequence at absolute positions j * BLOCK_Q .. (j + 1) * BLOCK_Q - 1 -- and
# all G query heads sharing kv_head, as ROWS = BLOCK_Q * G_PAD rows of one tile (GQA: each
# key tile is loaded once per group). Keys are visited in tiles of KEY_TILE aligned to
# absolute position 0. Query blocks are aligned to absolute positions like the key tiles,
# so a query row sits at row (pos % BLOCK_Q) * G_PAD + g of its tile however its prompt
# is chunked: tl.dot (and numpy/BLAS under the interpreter, whose value for a row depends
# on where it sits in the tile) always sees it in the same place. Every tile size is fixed
# by the model config alone, and a row's keys past its causal limit add exact zeros
# (p = 0, alpha = 1), so a row's output is the same bits whichever rows share its
# program or launch.
ATTN_ROWS = 32  # query rows per program (>= 16 for tl.dot); fixed, never batch-dependent

try:  # the CPU engine runs without Triton; only the launcher below needs it
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only where Triton is absent
    triton = None

if triton is not None:

    @triton.jit
    def _find_seq(qsl_ptr, block_idx, num_seqs, BLOCK_Q: tl.constexpr):
        # Sequence s owns program blocks qsl[s] // BLOCK_Q + 2 s + (0..): the last s whose
        # first block is <= block_idx (no host-side table per step). q_len queries at any
        # offset touch at most q_len // BLOCK_Q + 2 aligned blocks, hence the 2 s.
        lo = 0
        hi = num_seqs
        while lo < hi:
            mid = (lo + hi) // 2
            first = tl.load(qsl_ptr + mid) // BLOCK_Q + 2 * mid
            if first <= block_idx:
                lo = mid + 1
            else:
                hi = mid
        return lo - 1

    @triton.jit
    def _key_tile_offsets(bt_ptr, seq, bt_stride, tile, seq_len, kv_head,
                          block_size, num_kv_heads, head_dim, BLOCK_N: tl.constexpr):
        # Flat cache offsets of keys tile*BLOCK_N + (0..BLOCK_N): a tile may span blocks.
        key_pos = tile * BLOCK_N + tl.arange(0, BLOCK_N)
        key_ok = key_pos < seq_len
        block = tl.load(bt_ptr + seq * bt_stride + key_pos // block_size, mask=key_ok, other=0)
        slot = block.to(tl.int64) * block_size + key_pos % block_size
        return key_pos, key_ok, (slot * num_kv_heads + kv_head) * head_dim

    @triton.jit
    def _online_softmax_step(q, k, v, allowed, m, den, acc, scale, FP32_DOT: tl.constexpr):
        # One key tile: scores, running max m, denominator den and numerator acc (fp32).
        if FP32_DOT:  # never TF32: fp32 models get fp32 scores
            s = tl.dot(q, tl.trans(k), input_precision="ieee") * scale
        else:
            s = tl.dot(q, tl.trans(k)) * scale  # [ROWS, BLOCK_N], fp32 accumulate
        s = tl.where(allowed, s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with no key yet
        p = tl.exp(s - m_safe[:, None])
        alpha = tl.exp(m - m_safe)
        den = den * alpha + tl.sum(p, axis=1)
        if FP32_DOT:
            acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
        else:  # 16-bit caches: probabilities in the value dtype, as HF eager attention
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        return m_new, den, acc

    @triton.jit(do_not_specialize=["num_seqs"])  # one compiled kernel for every batch
    def _paged_attention_kernel(
        q_ptr, k_cache_ptr, v_cache_ptr, out_ptr, qsl_ptr, seq_lens_ptr, bt_ptr,
        q_stride_t, q_stride_h, bt_stride, num_seqs, scale,
        block_size, num_kv_heads, head_dim,
        GROUP: tl.constexpr, G_PAD: tl.constexpr, BLOCK_Q: tl.constexpr,
        D_PAD: tl.constexpr, BLOCK_N: tl.constexpr, FP32_DOT: tl.constexpr,
    ):
        block_idx = tl.program_id(0)
        kv_head = tl.program_id(1)
        seq = _find_seq(qsl_ptr, block_idx, num_seqs, BLOCK_Q)
        q_start = tl.load(qsl_ptr + seq)
        q_len = tl.load(qsl_ptr + seq + 1) - q_start
        seq_len = tl.load(seq_lens_ptr + seq)
        ctx = seq_len - q_len  # absolute position of the sequence's first query
        block_start = (ctx // BLOCK_Q + block_idx - (q_start // BLOCK_Q + 2 * seq)) * BLOCK_Q
        if block_start >= seq_len:  # the grid is an upper bound on the blocks
            return

        rows = tl.arange(0, BLOCK_Q * G_PAD)
        q_pos = block_start + rows // G_PAD  # [ROWS] absolute positions, aligned blocks
        tok = q_pos - ctx  # [ROWS] query index within this step's chunk
        head = kv_head * GROUP + rows % G_PAD
        row_ok = (tok >= 0) & (tok < q_len) & (rows % G_PAD < GROUP)
        d = tl.arange(0, D_PAD)
        d_ok = d < head_dim
        q_off = (q_start + tok).to(tl.int64) * q_stride_t + head * q_stride_h
        q = tl.load(q_ptr + q_off[:, None] + d[None, :], mask=row_ok[:, None] & d_ok[None, :],
                    other=0.0)  # [ROWS, D_PAD]

        m = tl.full([BLOCK_Q * G_PAD], float("-inf"), tl.float32)
        den = tl.zeros([BLOCK_Q * G_PAD], tl.float32)
        acc = tl.zeros([BLOCK_Q * G_PAD, D_PAD], tl.float32)
        last_pos = tl.minimum(block_start + BLOCK_Q, seq_len) - 1
        for tile in range(0, last_pos // BLOCK_N + 1):
            key_pos, key_ok, off = _key_tile_offsets(
                bt_ptr, seq, bt_stride, tile, seq_len, kv_head,
                block_size, num_kv_heads, head_dim, BLOCK_N)
            kv_mask = key_ok[:, None] & d_ok[None, :]
            k = tl.load(k_cache_ptr + off[:, None] + d[None, :], mask=kv_mask, other=0.0)
            v = tl.load(v_cache_ptr + off[:, None] + d[None, :], mask=kv_mask, other=0.0)
            allowed = (key_pos[None, :] <= q_pos[:, None]) & key_ok[None, :]  # [ROWS, BLOCK_N]
            m, den, acc = _online_softmax_step(q, k, v, allowed, m, den, acc, scale, FP32_DOT)
        out = acc / den[:, None]
        o_off = (q_start + tok).to(tl.int64) * (num_kv_heads * GROUP * head_dim) + head * head_dim
        tl.store(out_ptr + o_off[:, None] + d[None, :], out.to(out_ptr.dtype.element_ty),
                 mask=row_ok[:, None] & d_ok[None, :])


def paged_attention_triton(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:
    """Same contract as paged_attention_torch, in one launch for the whole mixed batch."""
    if triton is None:
        raise RuntimeError("paged_attention_triton needs the `triton` package")
    num_tokens, num_heads, head_dim = q.shape
    _, block_size, num_kv_heads, cache_dim = k_cache.shape
    if cache_dim != head_dim or num_heads % num_kv_heads or k_cache.shape != v_cache.shape:
        raise ValueError(f"q {tuple(q.shape)} does not fit cache {tuple(k_cache.shape)}")
    if not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        raise ValueError("k_cache and v_cache must be contiguous")
    if q.dtype != k_cache.dtype:
        raise ValueError(f"q is {q.dtype} but the cache is {k_cache.dtype}")
    if q.stride(-1) != 1:
        q = q.contiguous()
    group = num_heads // num_kv_heads
    g_pad = triton.next_power_of_2(group)
    block_q = max(1, ATTN_ROWS // g_pad)
    num_seqs = meta.seq_lens.shape[0]
    qsl = meta.query_start_loc.to(torch.int64).contiguous()
    seq_lens = meta.seq_lens.to(torch.int64).contiguous()
    tables = meta.block_tables.to(torch.int64).contiguous()
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)  # [T, Hq, D]
    if num_tokens == 0:
        return out
    grid = (num_tokens // block_q + 2 * num_seqs, num_kv_heads)  # >= the blocks actually used
    _paged_attention_kernel[grid](
        q, k_cache, v_cache, out, qsl, seq_lens, tables,
        q.stride(0), q.stride(1), tables.stride(0), num_seqs, scale,
        block_size, num_kv_heads, head_dim,
        GROUP=group, G_PAD=g_pad, BLOCK_Q=block_q, D_PAD=max(16, triton.next_power_of_2(head_dim)),
        BLOCK_N=KEY_TILE, FP32_DOT=q.dtype == torch.float32,
    )
    return out
