"""SiLU(gate) * up (kernels/activation.py) against the model's exact torch form, and
bitwise row invariance (the Triton backend's MLP activation)."""
from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

import pytest
import torch

from asyncengine.models.llama import silu_mul
from kernels.activation import silu_mul_triton
from tests.cuda_support import interpreted_or_skip


@pytest.mark.usefixtures("need_triton")
@pytest.mark.parametrize("rows,inter", [(1, 128), (9, 1500)])
def test_matches_torch_exact_form(rows: int, inter: int) -> None:
    interpreted_or_skip()
    gate_up = 3 * torch.randn(rows, 2 * inter, generator=torch.Generator().manual_seed(rows))
    got = silu_mul_triton(gate_up)
    torch.testing.assert_close(got, silu_mul(gate_up, exact=True), rtol=1e-6, atol=1e-7)
    # Rows alone equal rows in the batch, bitwise; a strided view is accepted.
    for r in range(rows):
        assert torch.equal(silu_mul_triton(gate_up[r : r + 1]), got[r : r + 1])
    assert torch.equal(silu_mul_triton(torch.cat([gate_up, gate_up], 1)[:, : 2 * inter]), got)
    with pytest.raises(ValueError, match="2I"):
        silu_mul_triton(gate_up[:, 1:])
