"""The fp32 GEMM weight packing of the CPU ops, written into a buffer we keep.

`kernels.attention_cpu.pack_linear_weight` returns a new tensor (zeroed, then filled):
for a weight update that is 540 MB of fresh pages to fault in on every update. The
layout is a permutation (kernels/csrc/gemm_cpu.cpp): groups of 3 panels of 16 columns,
group g of width J*16 stored [K, J*16] from offset g*48*K, columns past N zero, the whole
[ceil(N/16), K, 16]. `pack_into` writes the same bytes into a given buffer with two
strided copies. It is used only where it gives the op's bytes exactly: `matches_op`
checks that on weights of every tail shape (once per process), so a change of the
kernel's layout falls back to the op rather than to wrong outputs.
"""
from __future__ import annotations

import functools
from collections.abc import Callable

import torch

LANES, PANELS = 16, 3  # the kernel's kLanes, kGroup (panels per packed group)
GROUP = LANES * PANELS


def packed_numel(n: int, k: int) -> int:
    return -(-n // LANES) * LANES * k


def pack_into(w: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """w: fp32 [N, K] -> out (fp32, at least packed_numel) as [ceil(N/16), K, 16]."""
    n, k = w.shape
    panels, full = -(-n // LANES), n // GROUP
    out = out[: panels * LANES * k]
    if full:  # [G, 48, K] rows -> [G, K, 48]
        out[: full * GROUP * k].view(full, k, GROUP).copy_(w[: full * GROUP].view(full, GROUP, k).transpose(1, 2))
    rest = n - full * GROUP
    if rest:
        tail = out[full * GROUP * k :].view(k, (panels - full * PANELS) * LANES)  # [K, J * 16]
        tail[:, :rest].copy_(w[full * GROUP :].t())
        tail[:, rest:].zero_()
    return out.view(panels, k, LANES)


@functools.cache
def matches_op(op: Callable[[torch.Tensor], torch.Tensor | None]) -> bool:
    """Whether pack_into gives op's bytes, on shapes with full groups, a partial group, a
    partial panel and a lone panel."""
    gen = torch.Generator().manual_seed(0)
    for n, k in ((2 * GROUP, 3), (GROUP + 40, 5), (17, 2), (LANES, 1)):
        w = torch.randn(n, k, generator=gen)
        want = op(w)
        if want is None or want.dtype != torch.float32:
            return False
        got = pack_into(w, torch.full((packed_numel(n, k),), float("nan")))
        if want.shape != got.shape or not torch.equal(want, got):
            return False
    return True
