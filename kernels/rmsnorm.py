"""RMSNorm with an optional fused residual add."""
from __future__ import annotations

import torch


def rms_norm_torch(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """y = weight * normalize(x + residual); returns (y, x + residual or None).

    x, residual: [num_tokens, hidden]; weight: [hidden]. The statistics run in fp32 and
    the result is cast back before the weight multiply, as HF's LlamaRMSNorm does.
    """
    if residual is not None:
        x = residual + x  # same operand order as HF's `residual + hidden_states`
        residual = x
    xf = x.float()
    variance = xf.pow(2).mean(-1, keepdim=True)  # [num_tokens, 1]
    y = xf * torch.rsqrt(variance + eps)
    return weight * y.to(x.dtype), residual


# --- Triton -------------------------------------------------------------------------
try:  # the CPU engine runs without Triton; only the launchers below need it
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only where Triton is absent
    triton = None

if triton is not None:

    @triton.jit(do_not_specialize=["num_tokens"])  # one compiled kernel for every batch
    def _rms_norm_kernel(
        x_ptr, res_ptr, w_ptr, y_ptr, new_res_ptr,
        num_tokens, hidden, eps,
        HAS_RESIDUAL: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr,
    ):
        # BLOCK_R tokens per program (fixed, never from the batch), each a whole row of one
        # block, so a row's sum of squares is one tl.sum over a fixed width along its own
        # row: the same reduction whatever the batch size or the row's place in the block.
        rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)[:, None]  # [BR, 1]
        cols = tl.arange(0, BLOCK_H)[None, :]  # [1, BH]
        mask = (rows < num_tokens) & (cols < hidden)
        offs = rows * hidden + cols
        x = tl.load(x_ptr + offs, mask=mask, other=0.0)  # [BR, BH]
        if HAS_RESIDUAL:
            r = tl.load(res_ptr + offs, mask=mask, other=0.0)
            # fp32 add of two 16-bit values, rounded once to their dtype: the same bits
            # as torch's add in that dtype (fp32 has more than 2p + 2 bits).
            x = (r.to(tl.float32) + x.to(tl.float32)).to(x.dtype)
            tl.store(new_res_ptr + offs, x, mask=mask)
        xf = x.to(tl.float32)
        variance = tl.sum(xf * xf, axis=1) / hidden  # [BR]
        normed = (xf * tl.rsqrt(variance + eps)[:, None]).to(x.dtype)  # cast back before the weight, as HF
        w = tl.load(w_ptr + cols, mask=cols < hidden, other=0.0)
        y = w.to(tl.float32) * normed.to(tl.float32)
        tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


def rms_norm_triton(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Same contract as rms_norm_torch; BLOCK_R tokens per program."""
    if triton is None:
        raise RuntimeError("rms_norm_triton needs the `triton` package")
    num_tokens, hidden = x.shape
    if weight.shape != (hidden,):
        raise ValueError(f"weight {tuple(weight.shape)} does not match hidden {hidden}")
    x, weight = x.contiguous(), weight.contiguous()
    new_residual = None
    if residual is not None:
        if residual.shape != x.shape or residual.dtype != x.dtype:
            raise ValueError("residual must match x in shape and dtype")
        residual = residual.contiguous()
        new_residual = torch.empty_like(x)
    y = torch.empty(x.shape, dtype=torch.promote_types(weight.dtype, x.dtype), device=x.device)
    if num_tokens == 0:
        return y, new_residual
    block_h = triton.next_power_of_2(hidden)  # the whole row in one block
    block_r = max(1, min(16, 4096 // block_h))  # rows per program: fixed by the hidden size alone
    _rms_norm_kernel[(triton.cdiv(num_tokens, block_r),)](
        x, residual if residual is not None else x, weight, y,
        new_residual if new_residual is not None else y,
        num_tokens, hidden, eps,
        HAS_RESIDUAL=residual is not None, BLOCK_R=block_r, BLOCK_H=block_h,
        num_warps=8 if block_h >= 4096 else 4,  # fixed per hidden size: batch-invariant
    )
    return y, new_residual
