"""SiLU(gate) * up for the MLP, one Triton pass over the fused gate|up projection.

The torch reference is asyncengine.models.llama.silu_mul (exact form): g / (1 + exp(-g))
in fp32, rounded once to the dtype, then times up in the dtype. Each element is computed
on its own, so a row's bits never depend on the batch.
"""
from __future__ import annotations

import torch

try:  # the CPU engine runs without Triton; only the launcher below needs it
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only where Triton is absent
    triton = None

BLOCK = 1024  # elements of one row per program


if triton is not None:

    @triton.jit
    def _silu_mul_kernel(gu_ptr, out_ptr, inter, stride_row, BLOCK_I: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)
        ok = cols < inter
        gate = tl.load(gu_ptr + row * stride_row + cols, mask=ok, other=0.0)
        up = tl.load(gu_ptr + row * stride_row + inter + cols, mask=ok, other=0.0)
        g = gate.to(tl.float32)
        act = (g / (1.0 + tl.exp(-g))).to(gate.dtype)  # rounded once, as the torch path
        # A product of two values of the dtype, rounded once: torch's mul in that dtype.
        y = act.to(tl.float32) * up.to(tl.float32)
        tl.store(out_ptr + row * inter + cols, y.to(gate.dtype), mask=ok)


def silu_mul_triton(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up: [T, 2I] (gate | up) -> silu(gate) * up: [T, I] in gate_up's dtype."""
    if triton is None:
        raise RuntimeError("silu_mul_triton needs the `triton` package")
    if gate_up.dim() != 2 or gate_up.shape[1] % 2:
        raise ValueError(f"gate_up must be [T, 2I], got {tuple(gate_up.shape)}")
    if gate_up.stride(1) != 1:
        gate_up = gate_up.contiguous()
    rows, inter = gate_up.shape[0], gate_up.shape[1] // 2
    out = torch.empty(rows, inter, dtype=gate_up.dtype, device=gate_up.device)  # [T, I]
    if rows == 0:
        return out
    _silu_mul_kernel[(rows, triton.cdiv(inter, BLOCK))](gate_up, out, inter, gate_up.stride(0), BLOCK_I=BLOCK)
    return out
