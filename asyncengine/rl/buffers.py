"""Reused staging memory: the buffers a weight update is received and packed into.

A fresh 540 MB tensor costs more to fault in page by page than to fill (measured on the
2-core Xeon under load: a first copy into fresh 4 KB pages ~0.9-1.1 s, into fresh huge
pages ~0.5-0.9 s, into memory written before ~0.3-0.5 s). So the received tensors (which
become the new weights by reference) and their GEMM packings live in buffers kept across
updates, on transparent huge pages: two sets, alternating. The engine serves from one
set (after the first update); the next update writes the other, the spare, which no one
reads: `flip()` at the swap makes the set just written the served one and the served one
the spare.
"""
from __future__ import annotations

import threading
from collections.abc import Hashable

import torch

from kernels.huge_pages import empty_bytes


class SpareBuffers:
    """Two sets of named byte buffers; `get` hands out the spare set's, `flip` swaps the sets."""

    def __init__(self) -> None:
        self._sets: tuple[dict[Hashable, torch.Tensor], dict[Hashable, torch.Tensor]] = ({}, {})
        self._spare = 0
        self._lock = threading.Lock()

    def get(self, key: Hashable, nbytes: int) -> torch.Tensor:
        """uint8 [nbytes] of the spare set under key (kept from an earlier update when it
        is large enough, else new). Its contents are whatever was there."""
        with self._lock:
            bufs = self._sets[self._spare]
            buf = bufs.get(key)
            if buf is None or buf.numel() < nbytes:
                bufs.pop(key, None)  # release the small one before allocating
                buf = bufs[key] = empty_bytes(nbytes)
            return buf[:nbytes]

    def flip(self) -> None:
        """The spare set is now served (called at the swap); the served one becomes spare."""
        with self._lock:
            self._spare ^= 1

    def clear(self) -> None:
        with self._lock:
            self._sets = ({}, {})

    @property
    def nbytes(self) -> int:
        return sum(b.numel() for s in self._sets for b in s.values())
