"""Rotary position embedding (the half-split "rotate_half" layout of HF Llama/Qwen)."""
from __future__ import annotations

import torch


def rope_cos_sin(inv_freq: torch.Tensor, attention_scaling: float, max_positions: int) -> torch.Tensor:
    """Precompute [max_positions, head_dim] = cat(cos, sin) over the half dimension.

    Computed exactly as HF does per position (position * inv_freq in fp32), so a table
    lookup gives the same bits as HF's on-the-fly computation.
    """
    positions = torch.arange(max_positions, dtype=torch.int64).float()  # [P]
    freqs = positions[:, None] * inv_freq.float()[None, :]  # [P, D/2]
    cos = freqs.cos() * attention_scaling
    sin = freqs.sin() * attention_scaling
    return torch.cat([cos, sin], dim=-1)  # [P, D]


def apply_rope_torch(
    q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """q: [T, Hq, D], k: [T, Hkv, D], positions: [T] int64, cos_sin: [P, D] fp32."""
    half = q.shape[-1] // 2
    cs = cos_sin.index_select(0, positions)  # [T, D]
    cos = cs[:, None, :half].to(q.dtype)  # [T, 1, D/2]
    sin = cs[:, None, half:].to(q.dtype)
    return _rotate(q, cos, sin, half), _rotate(k, cos, sin, half)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, half: int) -> torch.Tensor:
    x1, x2 = x[..., :half], x[..., half:]
    # HF: x * cat(cos, cos) + rotate_half(x) * cat(sin, sin), with rotate_half = cat(-x2, x1)
    return torch.cat([x1 * cos + (-x2) * sin, x2 * cos + x1 * sin], dim=-1)


# --- Triton -------------------------------------------------------------------------
try:  # the CPU engine runs without Triton; only the launchers below need it
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only where Triton is absent
    triton = None

# Programs take BLOCK_T tokens each (fixed), all their heads as rows (token, head) of one
# [BLOCK_T * BLOCK_HEADS, BLOCK_HALF] tile; every element is rotated on its own, so the
# grouping cannot change a bit (it only saves programs, which the interpreter pays for).
ROPE_TOKENS = 16

if triton is not None:

    @triton.jit
    def _rotate_rows(
        x_ptr, out_ptr, pos_ptr, cs_ptr, t0, num_tokens, stride_t, stride_h, num_heads, half,
        BLOCK_T: tl.constexpr, BLOCK_HEADS: tl.constexpr, BLOCK_HALF: tl.constexpr,
    ):
        r = tl.arange(0, BLOCK_T * BLOCK_HEADS)[:, None]
        token = t0 + r // BLOCK_HEADS  # [R, 1]
        head = r % BLOCK_HEADS
        cols = tl.arange(0, BLOCK_HALF)[None, :]
        tok_ok = token < num_tokens
        mask = tok_ok & (head < num_heads) & (cols < half)
        pos = tl.load(pos_ptr + token, mask=tok_ok, other=0)  # [R, 1] each row's position
        cos = tl.load(cs_ptr + pos * 2 * half + cols, mask=mask, other=0.0)  # [R, BLOCK_HALF]
        sin = tl.load(cs_ptr + pos * 2 * half + half + cols, mask=mask, other=0.0)
        src = x_ptr + token * stride_t + head * stride_h + cols
        x1 = tl.load(src, mask=mask, other=0.0)
        x2 = tl.load(src + half, mask=mask, other=0.0)
        dt = x1.dtype
        c = cos.to(dt).to(tl.float32)  # the torch path casts the table to the model dtype
        s = sin.to(dt).to(tl.float32)
        x1f, x2f = x1.to(tl.float32), x2.to(tl.float32)
        # Each product is rounded to the model dtype before the add, as torch does.
        y1 = ((x1f * c).to(dt).to(tl.float32) + (-x2f * s).to(dt).to(tl.float32)).to(dt)
        y2 = ((x2f * c).to(dt).to(tl.float32) + (x1f * s).to(dt).to(tl.float32)).to(dt)
        dst = out_ptr + token * num_heads * 2 * half + head * 2 * half + cols
        tl.store(dst, y1, mask=mask)
        tl.store(dst + half, y2, mask=mask)

    @triton.jit(do_not_specialize=["num_tokens"])  # one compiled kernel for every batch
    def _rope_kernel(
        q_ptr, k_ptr, q_out_ptr, k_out_ptr, pos_ptr, cs_ptr, num_tokens,
        q_stride_t, q_stride_h, k_stride_t, k_stride_h,
        num_q_heads, num_kv_heads, half,
        BLOCK_T: tl.constexpr, BLOCK_QH: tl.constexpr, BLOCK_KH: tl.constexpr, BLOCK_HALF: tl.constexpr,
    ):
        t0 = tl.program_id(0).to(tl.int64) * BLOCK_T
        _rotate_rows(q_ptr, q_out_ptr, pos_ptr, cs_ptr, t0, num_tokens, q_stride_t, q_stride_h,
                     num_q_heads, half, BLOCK_T, BLOCK_QH, BLOCK_HALF)
        _rotate_rows(k_ptr, k_out_ptr, pos_ptr, cs_ptr, t0, num_tokens, k_stride_t, k_stride_h,
                     num_kv_heads, half, BLOCK_T, BLOCK_KH, BLOCK_HALF)


def apply_rope_triton(
    q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as apply_rope_torch; q and k may be strided views (e.g. slices of a
    fused qkv projection) as long as the head dimension is contiguous."""
    if triton is None:
        raise RuntimeError("apply_rope_triton needs the `triton` package")
    num_tokens, num_q_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    if k.shape[0] != num_tokens or k.shape[2] != head_dim or head_dim % 2:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} do not fit together")
    if q.stride(-1) != 1 or k.stride(-1) != 1:
        q, k = q.contiguous(), k.contiguous()
    if cos_sin.dtype != torch.float32 or cos_sin.shape[1] != head_dim:
        raise ValueError("cos_sin must be the fp32 [P, head_dim] table of rope_cos_sin")
    cos_sin, positions = cos_sin.contiguous(), positions.to(torch.int64).contiguous()
    q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)  # [T, Hq, D] contiguous
    k_out = torch.empty(k.shape, dtype=k.dtype, device=k.device)  # [T, Hkv, D]
    if num_tokens == 0:
        return q_out, k_out
    _rope_kernel[(triton.cdiv(num_tokens, ROPE_TOKENS),)](
        q, k, q_out, k_out, positions, cos_sin, num_tokens,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1),
        num_q_heads, num_kv_heads, head_dim // 2,
        BLOCK_T=ROPE_TOKENS, BLOCK_QH=triton.next_power_of_2(num_q_heads), BLOCK_KH=triton.next_power_of_2(num_kv_heads),
        BLOCK_HALF=triton.next_power_of_2(head_dim // 2),
    )
    return q_out, k_out
