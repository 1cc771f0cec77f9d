"""kernels/host_heap.py: with the thresholds fixed, freed blocks are reused, not faulted in
again; EngineCore applies it on the CPU unless the config says not to."""
from __future__ import annotations

import platform
import subprocess
import sys
from pathlib import Path

import pytest

from asyncengine import engine_core
from asyncengine.config import EngineConfig
from asyncengine.engine_core import EngineCore

ROOT = Path(__file__).resolve().parents[2]

# Blocks a little larger each time, like prefill chunks whose size varies: glibc's moving
# threshold maps (and the kernel zero-fills) each new largest block afresh; with the fixed
# one they come from the heap, which grows by the difference only. Prints minor faults.
_GROWING = """
import resource, sys, torch
from kernels import host_heap
if sys.argv[1] == "1":
    assert host_heap.retain() and host_heap.retain()
f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for i in range(40):
    t = torch.empty((8 << 20) + i * (256 << 10), dtype=torch.uint8)
    t.fill_(1)  # every page touched
    del t
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
"""


def _faults(retain: bool) -> int:
    out = subprocess.run([sys.executable, "-c", _GROWING, "1" if retain else "0"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120, check=True)
    return int(out.stdout.split()[-1])


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the thresholds are glibc's malloc's")
def test_retained_heap_reuses_freed_blocks() -> None:
    pages = 40 * (8 << 20) // 4096  # what mapping every block afresh would fault, at least
    default, retained = _faults(False), _faults(True)
    assert default > pages // 2, f"glibc's default mapped afresh less than expected ({default} faults)"
    assert retained < default // 4, f"retained heap faulted {retained} times vs {default} by default"


@pytest.mark.parametrize("retain", [True, False])
def test_engine_core_applies_it_on_cpu(llama_dir: Path, monkeypatch: pytest.MonkeyPatch, retain: bool) -> None:
    calls: list[None] = []
    monkeypatch.setattr(engine_core.host_heap, "retain", lambda: calls.append(None) or True)
    EngineCore(EngineConfig(model=str(llama_dir), num_kv_blocks=16, retain_host_heap=retain))
    assert len(calls) == (1 if retain else 0)
