"""glibc's heap kept for the next step's tensors rather than handed back to the kernel.

Every op of a step returns a new tensor, and a prefill chunk's are tens of MB (fp32
gate_up at 2048 tokens is 2048 x 3072 x 4 B = 25 MB). glibc's malloc serves blocks above
a threshold by mmap and trims the heap's free top past twice that threshold, both moving
with the sizes it has seen; on the CPU engine's allocation pattern that gave back and
faulted in again, zeroed, 0.25-0.8 GB of pages a step: 60-200 K minor faults in an fp32
step of 2048 prompt tokens on SmolLM2, the GEMMs' and fused ops' first stores waiting on
the kernel (AMD EPYC Zen 5, 2 cores); ~2.4 K after. Fixed thresholds stop it: blocks up to
32 MiB (glibc's largest mmap threshold) come from the heap, and up to 256 MiB of its free
top is kept. Measured there with `bench/step_phases.py --workload prefill` with and without
`--default-heap`, in alternate processes, six pairs: fp32 1315 / 1376 / 1337 / 1149 / 1384 /
1373 -> 1132 / 1112 / 1130 / 1168 / 1109 / 1177 ms a step (0.86 of the mean); bf16 (half the
bytes) 619 / 605 / 612 -> 631 / 573 / 605 (0.98); 64-sequence decode steps, whose tensors
are small, unchanged.

The setting is the process's: EngineCore applies it on the CPU unless
EngineConfig.retain_host_heap is False (a process that embeds the engine next to other
work and wants its heap trimmed). The memory kept is at most what a step already used.
"""
from __future__ import annotations

import ctypes
import sys

# mallopt parameters (glibc's malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 << 20  # bytes; glibc refuses more on 64-bit
TRIM_THRESHOLD = 256 << 20  # bytes of free heap top kept


def _glibc() -> ctypes.CDLL | None:
    if sys.platform != "linux":
        return None
    libc = ctypes.CDLL(None)
    return libc if hasattr(libc, "gnu_get_libc_version") and hasattr(libc, "mallopt") else None


def retain() -> bool:
    """Fix glibc's mmap and trim thresholds for this process (idempotent). True when both
    took; False where the C library is not glibc, which keeps its own policy."""
    libc = _glibc()
    if libc is None:
        return False
    ok_mmap = libc.mallopt(_M_MMAP_THRESHOLD, ctypes.c_int(MMAP_THRESHOLD))
    ok_trim = libc.mallopt(_M_TRIM_THRESHOLD, ctypes.c_int(TRIM_THRESHOLD))
    return bool(ok_mmap) and bool(ok_trim)
