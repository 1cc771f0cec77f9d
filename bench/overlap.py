"""How much of a scattered read one core can hide under its own arithmetic.

The decode step's speed of light (bench/sol.py) counts attention's KV reads as free under
the GEMMs' FMAs; on a core without a second hardware thread that overlap has to come from
software: hint the next KV run into L2 while a GEMM tile computes, then read it from L2.
This measures what that buys, with the compiled probe kernels/csrc/overlap_probe_cpu.cpp
on every intra-op thread: runs of --run-bytes (4096: a block's keys and values of one head
in bf16) at random places in a 1 GiB pool on huge pages, and register-only FMA blocks of
--iters x 24 FMAs between them.

    python bench/overlap.py                      # FMA blocks of 50, 100, 200 and 400 x 24
    python bench/overlap.py --threads 1 --iters 200

Per block size it prints ns per run of: the runs read back to back (hinted ahead, as the
decode attention reads), the FMA blocks alone, the two in turn, the two interleaved (the
next run hinted over each block, then read from L2), and the interleaved blocks without
the reads; then what the hints cost the arithmetic per line, and the share of the read
time that interleaving removes against running reads and blocks apart (the engine today).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kernels import attention_cpu, huge_pages  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--iters", default="50,100,200,400", help="FMA block sizes, in steps of 24 FMAs")
    ap.add_argument("--run-bytes", type=int, default=4096)
    ap.add_argument("--runs", type=int, default=20000, help="runs per mode and thread")
    ap.add_argument("--threads", type=int, default=0, help="0: torch's intra-op threads")
    ap.add_argument("--repeats", type=int, default=3, help="best of this many probes per size")
    a = ap.parse_args()
    if not attention_cpu.available():
        raise SystemExit("the compiled CPU ops are not available (no C++ compiler?)")
    if a.threads:
        torch.set_num_threads(a.threads)
    pool = huge_pages.empty_bytes(1 << 30)
    pool.fill_(1)  # touched, so the probes read memory rather than fault pages in
    probe = torch.ops.asyncengine_cpu.overlap_probe
    lines = a.run_bytes // 64
    print(f"{torch.get_num_threads()} threads, runs of {a.run_bytes} B over a 1 GiB pool; ns per run, "
          "best of each mode over the repeats")
    print(f"{'FMAs':>6} {'read':>7} {'compute':>8} {'serial':>7} {'interleaved':>12} {'hinted':>7} "
          f"{'GB/s':>6} {'hint ns/line':>13} {'read hidden':>12}")
    for seed, iters in enumerate(int(x) for x in a.iters.split(",")):
        runs = [probe(pool, a.runs, iters, a.run_bytes, seed * 100 + r) for r in range(a.repeats)]
        if not any(any(r) for r in runs):
            raise SystemExit("this build has no AVX-512: the probe measures nothing here")
        read, compute, serial, inter, hinted = (min(r[m] for r in runs) for m in range(5))
        hidden = (read + compute - inter) / read
        print(f"{24 * iters:>6} {read:>7.0f} {compute:>8.0f} {serial:>7.0f} {inter:>12.0f} {hinted:>7.0f} "
              f"{a.run_bytes / read:>6.1f} {(hinted - compute) / lines:>13.2f} {hidden:>12.0%}", flush=True)


if __name__ == "__main__":
    main()
