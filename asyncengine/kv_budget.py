"""How many KV blocks the pool gets when the config does not say.

Given num_kv_blocks, that; given kv_cache_memory_gb, as many blocks as fit in it. Given
neither, the pool is sized from the memory available when the engine starts (after the
weights are loaded), as vLLM sizes its pool from free GPU memory: the smaller of
  - what max_num_seqs sequences of max_model_len tokens can ever hold at once (more blocks
    would only serve the prefix cache), and
  - KV_MEMORY_FRACTION of the available memory: the kernel's MemAvailable, or the cgroup's
    headroom (memory.max - memory.current) where a container limit is lower,
and never fewer than 2 blocks.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

from asyncengine.config import EngineConfig

log = logging.getLogger(__name__)

# A quarter of what is free: the rest is left to the activations, to other processes on a
# shared host (a second engine started later sizes itself from what this one left), and
# to the page cache. The pool is zeroed at start, so all of it is resident at once.
KV_MEMORY_FRACTION = 0.25
_CGROUP = Path("/sys/fs/cgroup")


def _meminfo_available() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _cgroup_headroom() -> int | None:
    try:
        limit = (_CGROUP / "memory.max").read_text().strip()
        if limit == "max":
            return None
        return max(0, int(limit) - int((_CGROUP / "memory.current").read_text()))
    except (OSError, ValueError):
        return None


def available_memory_bytes() -> int:
    """Memory this process could still allocate without swapping, as best known."""
    known = [b for b in (_meminfo_available(), _cgroup_headroom()) if b is not None]
    if known:
        return min(known)
    try:  # not Linux: the physical pages not in use
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, AttributeError):
        return 2 * 2**30  # nothing to go by: the old fixed default


def kv_pool_blocks(config: EngineConfig, bytes_per_block: int, max_model_len: int,
                   available: int | None = None) -> int:
    """Blocks in the KV pool for this config (see the module docstring)."""
    if config.num_kv_blocks is not None:
        return config.num_kv_blocks
    if config.kv_cache_memory_gb is not None:
        return max(2, int(config.kv_cache_memory_gb * 2**30 // bytes_per_block))
    per_seq = -(-max_model_len // config.block_size)
    needed = config.max_num_seqs * per_seq
    free = available_memory_bytes() if available is None else available
    fits = int(free * KV_MEMORY_FRACTION // bytes_per_block)
    blocks = max(2, min(needed, fits))
    log.info("KV pool: %d blocks of %d bytes (%.2f GiB): %d needed for %d sequences of %d tokens, %d fit in "
             "%.0f%% of %.2f GiB available", blocks, bytes_per_block, blocks * bytes_per_block / 2**30, needed,
             config.max_num_seqs, max_model_len, fits, 100 * KV_MEMORY_FRACTION, free / 2**30)
    return blocks
