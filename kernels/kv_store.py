"""Write new keys/values into the paged KV cache by slot."""
from __future__ import annotations

import torch


def store_kv_torch(
    key: torch.Tensor,
    value: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """key, value: [T, Hkv, D]; k_cache, v_cache: [num_blocks, block_size, Hkv, D];
    slot_mapping: [T] int64, slot = block_id * block_size + offset. Writes in place."""
    # flatten(0, 1) is a view for the contiguous layout and for the head-major one the
    # torch backend allocates (see kernels.attention.head_major_cache).
    k_cache.flatten(0, 1).index_copy_(0, slot_mapping, key.to(k_cache.dtype))
    v_cache.flatten(0, 1).index_copy_(0, slot_mapping, value.to(v_cache.dtype))


# --- Triton -------------------------------------------------------------------------
try:  # the CPU engine runs without Triton; only the launcher below needs it
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only where Triton is absent
    triton = None

STORE_TOKENS = 16  # new tokens per program (a plain copy: grouping changes no bit)

if triton is not None:

    @triton.jit(do_not_specialize=["num_tokens"])  # one compiled kernel for every batch
    def _store_kv_kernel(
        key_ptr, value_ptr, k_cache_ptr, v_cache_ptr, slot_ptr, num_tokens,
        k_stride_t, k_stride_h, v_stride_t, v_stride_h,
        num_kv_heads, head_dim,
        BLOCK_T: tl.constexpr, BLOCK_HEADS: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        # Rows (token, head) of BLOCK_T new tokens; a cache slot is Hkv * D contiguous
        # elements, so slot s starts at s * Hkv * D in the flat cache.
        r = tl.arange(0, BLOCK_T * BLOCK_HEADS)[:, None]
        token = tl.program_id(0).to(tl.int64) * BLOCK_T + r // BLOCK_HEADS  # [R, 1]
        heads = r % BLOCK_HEADS
        cols = tl.arange(0, BLOCK_D)[None, :]
        tok_ok = token < num_tokens
        slot = tl.load(slot_ptr + token, mask=tok_ok, other=-1)
        # negative slots mark padding tokens: nothing to write
        mask = tok_ok & (slot >= 0) & (heads < num_kv_heads) & (cols < head_dim)
        dst = slot * num_kv_heads * head_dim + heads * head_dim + cols
        k = tl.load(key_ptr + token * k_stride_t + heads * k_stride_h + cols, mask=mask)
        v = tl.load(value_ptr + token * v_stride_t + heads * v_stride_h + cols, mask=mask)
        tl.store(k_cache_ptr + dst, k.to(k_cache_ptr.dtype.element_ty), mask=mask)
        tl.store(v_cache_ptr + dst, v.to(v_cache_ptr.dtype.element_ty), mask=mask)


def store_kv_triton(
    key: torch.Tensor,
    value: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Same contract as store_kv_torch (key/value may be strided views with a contiguous
    head dim); a negative slot is skipped rather than written out of bounds."""
    if triton is None:
        raise RuntimeError("store_kv_triton needs the `triton` package")
    num_tokens, num_kv_heads, head_dim = key.shape
    if value.shape != key.shape or k_cache.shape[-2:] != (num_kv_heads, head_dim):
        raise ValueError(f"key/value {tuple(key.shape)} do not fit cache {tuple(k_cache.shape)}")
    if not (k_cache.is_contiguous() and v_cache.is_contiguous()) or k_cache.shape != v_cache.shape:
        raise ValueError("k_cache and v_cache must be contiguous and of the same shape")
    if key.stride(-1) != 1 or value.stride(-1) != 1:
        key, value = key.contiguous(), value.contiguous()
    slot_mapping = slot_mapping.to(torch.int64).contiguous()
    if num_tokens == 0:
        return
    _store_kv_kernel[(triton.cdiv(num_tokens, STORE_TOKENS),)](
        key, value, k_cache, v_cache, slot_mapping, num_tokens,
        key.stride(0), key.stride(1), value.stride(0), value.stride(1),
        num_kv_heads, head_dim,
        BLOCK_T=STORE_TOKENS, BLOCK_HEADS=triton.next_power_of_2(num_kv_heads), BLOCK_D=triton.next_power_of_2(head_dim),
    )
