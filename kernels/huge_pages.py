"""Host memory on transparent huge pages, for what the CPU engine reads every step.

A decode step streams every GEMM weight (310 MB in bf16, 513 MB in fp32 for SmolLM2)
and scattered KV blocks. On 4 KB pages each page is a TLB miss, and in a VM guest every
miss is a two-level page walk. Linux backs a range with 2 MB pages when it is advised
(MADV_HUGEPAGE) before it is touched, where transparent huge pages are "madvise" or
"always"; elsewhere the hint is skipped and the memory is ordinary.
"""
from __future__ import annotations

import ctypes
import sys
from collections.abc import Callable

import torch

_MADV_HUGEPAGE = 14
HUGE_PAGE = 1 << 21
_ALIGN = 4096  # tensors placed in an arena start on a page: every kernel's alignment holds


def empty_bytes(nbytes: int) -> torch.Tensor:
    """An uninitialized uint8 tensor [nbytes], 2 MB aligned, its whole 2 MB pages advised
    huge before they are touched (only a hint: skipped where madvise is missing)."""
    base = torch.empty(nbytes + HUGE_PAGE, dtype=torch.uint8)
    skip = -base.data_ptr() % HUGE_PAGE
    out = base[skip : skip + nbytes]
    span = nbytes // HUGE_PAGE * HUGE_PAGE
    if sys.platform == "linux" and span:
        try:
            ctypes.CDLL(None).madvise(ctypes.c_void_p(out.data_ptr()), ctypes.c_size_t(span), _MADV_HUGEPAGE)
        except (OSError, AttributeError):
            pass
    return out


def zeros(shape: tuple[int, ...], dtype: torch.dtype, device: str | torch.device = "cpu") -> torch.Tensor:
    """torch.zeros(shape), on huge pages when on the CPU."""
    if torch.device(device).type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    numel = 1
    for s in shape:
        numel *= s
    return empty_bytes(numel * torch.empty((), dtype=dtype).element_size()).view(dtype).view(shape).zero_()


class Arena:
    """Copies of tensors laid one after another in slabs of huge pages.

    Tensors are small next to a 2 MB page (SmolLM2's per-layer packings are 0.3-7 MB), so
    one slab holds many: each tensor alone would leave most of its pages small. A slab is
    slab_bytes, or one tensor's size when that is larger; its tail past the last tensor
    that fit is unused (under one tensor's size)."""

    def __init__(self, slab_bytes: int = 64 << 20,
                 new_slab: Callable[[int, int], torch.Tensor] = lambda index, nbytes: empty_bytes(nbytes)) -> None:
        """new_slab(index, nbytes): the index-th slab's memory, uint8 [nbytes] (a caller
        that packs again and again hands out kept buffers: asyncengine/rl/staging.py)."""
        self.slab_bytes, self._new_slab = slab_bytes, new_slab
        self._slab = torch.empty(0, dtype=torch.uint8)
        self._used = self._slabs = 0

    def place(self, t: torch.Tensor) -> torch.Tensor:
        """A contiguous copy of CPU tensor t (same shape, dtype and values) in the arena."""
        nbytes = t.numel() * t.element_size()
        start = -(-self._used // _ALIGN) * _ALIGN
        if start + nbytes > self._slab.numel():
            self._slab, start = self._new_slab(self._slabs, max(self.slab_bytes, nbytes)), 0
            self._slabs += 1
        self._used = start + nbytes
        out = self._slab[start : start + nbytes].view(t.dtype).view(t.shape)
        return out.copy_(t)
