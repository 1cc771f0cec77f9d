"""The read / compute overlap probe of bench/overlap.py (kernels/csrc/overlap_probe_cpu.cpp):
its argument checks, and that it times every mode (zeros only in a build without AVX-512)."""
from __future__ import annotations

import pytest
import torch

from kernels.attention_cpu import load
from kernels.huge_pages import empty_bytes


def _probe(pool: torch.Tensor, runs: int, iters: int, run_bytes: int = 4096) -> list[float]:
    load()
    return torch.ops.asyncengine_cpu.overlap_probe(pool, runs, iters, run_bytes, 0)


@pytest.mark.parametrize("bad", [
    dict(pool=torch.zeros(1 << 16), runs=10, iters=10),  # not bytes
    dict(pool=torch.zeros(1 << 16, dtype=torch.uint8)[::2], runs=10, iters=10),  # not contiguous
    dict(pool=torch.zeros(1 << 16, dtype=torch.uint8), runs=0, iters=10),
    dict(pool=torch.zeros(1 << 16, dtype=torch.uint8), runs=10, iters=0),
    dict(pool=torch.zeros(1 << 16, dtype=torch.uint8), runs=10, iters=10, run_bytes=1000),
    dict(pool=torch.zeros(1024, dtype=torch.uint8), runs=10, iters=10, run_bytes=4096),  # past the pool
])
def test_overlap_probe_rejects_bad_arguments(bad: dict) -> None:
    with pytest.raises(RuntimeError):
        _probe(**bad)


def test_overlap_probe_times_every_mode() -> None:
    pool = empty_bytes(16 << 20)
    pool.fill_(1)
    short, long = _probe(pool, 300, 4), _probe(pool, 300, 400)
    assert len(short) == len(long) == 5  # read, compute, serial, interleaved, hinted
    if not any(long):
        return  # built without AVX-512: the probe reports nothing, as the sol probes do
    assert all(t > 0 for t in short + long)
    # 100 times the FMAs per block: the modes that run blocks take longer, the read alone does not change kind.
    assert long[1] > short[1] and long[2] > short[2] and long[3] > short[3] and long[4] > short[4]
