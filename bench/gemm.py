"""The linear layers of whole forward steps: our batch-invariant GEMMs vs the library.

One step of SmolLM2-135M's GEMMs: 30 layers of distinct weights (qkv 960x576, o 576x576,
gate_up 3072x576, down 576x1536) and the 49152x576 head, 538 MB of fp32 weights, so
they stream from memory as in the engine (a loop over one small weight would sit in
cache). Rows: 64 (a decode step of 64 sequences) and 512 (a prefill chunk). Prints
ms per step and GFLOP/s of each, and the ratio ours / torch, alternating the two a few
rounds (this machine's speed drifts from second to second; compare within a round).

--dtype bfloat16 (CPUs with AMX-BF16 or AVX512-BF16): the 30 layers in bf16 (212 MB; the
engine keeps the head in fp32), our bf16 GEMM vs what the engine runs without it: oneDNN
on its prepacked weight in deterministic mode's 64-row tiles. --bf16-kernel picks ours:
amx (tile unit) or avx512 (VDPBF16PS on AMD, widened-bf16 FMAs on Intel: what CPUs without AMX run; on an AMX CPU this
forces it); default: the one the engine picks here.

    python bench/gemm.py                 # fp32, rows 64 and 512, 3 rounds
    python bench/gemm.py --rows 1,64 --rounds 5
    python bench/gemm.py --dtype bfloat16 --rows 32,64,512
    python bench/gemm.py --dtype bfloat16 --bf16-kernel avx512 --rounds 5
    python bench/gemm.py --cpu-time --threads 1   # on a shared machine: see below

--cpu-time: also the rate over the process's CPU time (all threads; spin-waits count) x
threads, next to the FMA peak measured the same way (sol_probe_cpu.cpp's register-only
loop): on a machine shared with other processes, wall time also counts the time others
held the cores; CPU time does not (it still pays their cache pollution, so it is a lower
bound of the quiet figure). The peak is probed again before every round and the highest
reading so far is the one divided by: on a guest VM, time the host takes the vCPU still
counts as the guest thread's CPU time, so one probe taken in a busy second read half the
peak (256 vs 495 GFLOP/s, AMD EPYC guest) and printed "137% of peak". --threads sets
torch's intra-op threads for the run.
"""
from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

# Run as a script, bench/ leads sys.path and bench/kernels.py would shadow `kernels`.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from asyncengine.models.llama import DEFAULT_GEMM_TILE_ROWS, linear, prepack  # noqa: E402
from kernels import attention_cpu  # noqa: E402

LAYER_SHAPES = ((960, 576), (576, 576), (3072, 576), (576, 1536))  # (N, K) per linear layer
HEAD_SHAPE = (49152, 576)
NUM_LAYERS = 30


def _step_ms(run: Callable[[], None], repeats: int) -> tuple[float, float]:
    """(wall ms, process CPU ms / threads) per step."""
    run()  # warm-up
    t, c = time.perf_counter(), time.process_time()
    for _ in range(repeats):
        run()
    cpu = (time.process_time() - c) / torch.get_num_threads()
    return (time.perf_counter() - t) / repeats * 1e3, cpu / repeats * 1e3


def _fma_peak_cpu_gflops() -> float:
    """The FMA peak over the threads' CPU time (best of 3 probes), GFLOP/s."""
    return max(torch.ops.asyncengine_cpu.fma_peak_fp32(10_000_000)[1] for _ in range(3)) / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default="64,512", help="comma-separated row counts M")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=3, help="steps timed per measurement")
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    ap.add_argument("--bf16-kernel", choices=("amx", "avx512"), default=None)
    ap.add_argument("--cpu-time", action="store_true", help="also rates over CPU time, vs the FMA peak")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    a = ap.parse_args()
    if a.threads is not None:
        torch.set_num_threads(a.threads)
    if not attention_cpu.available():
        raise SystemExit("the compiled CPU ops are not available (no C++ compiler?)")
    bf16 = a.dtype == "bfloat16"
    kernel = a.bf16_kernel or attention_cpu.bf16_gemm_kernel()
    have = {"amx": torch.ops.asyncengine_cpu.amx_available(), "avx512": torch.ops.asyncengine_cpu.avx512_bf16_available()}
    if bf16 and not have.get(kernel or "", False):
        raise SystemExit(f"this CPU has no {kernel or 'AMX-BF16 nor AVX512-BF16'}: bf16 GEMMs run oneDNN, nothing to compare")
    bf16_op = torch.ops.asyncengine_cpu.packed_linear_bf16 if kernel == "amx" else torch.ops.asyncengine_cpu.packed_linear_bf16_avx512
    dtype = torch.bfloat16 if bf16 else torch.float32
    torch.manual_seed(0)
    shapes = [s for _ in range(NUM_LAYERS) for s in LAYER_SHAPES] + ([] if bf16 else [HEAD_SHAPE])
    weights = [(torch.randn(n, k) / k**0.5).to(dtype) for n, k in shapes]  # [N, K] each
    packed = [attention_cpu.pack_linear_weight(w) for w in weights]
    library = [prepack(w) for w in weights] if bf16 else weights
    name = f"oneDNN x{DEFAULT_GEMM_TILE_ROWS} rows" if bf16 else "torch.mm"
    mb = sum(w.numel() * w.element_size() for w in weights) / 1e6
    print(f"threads {torch.get_num_threads()}; ours: {kernel if bf16 else 'fp32 FMA'}; {mb:.0f} MB of {a.dtype} weights")
    peak = _fma_peak_cpu_gflops() if a.cpu_time else 0.0
    if a.cpu_time:
        print(f"fp32 FMA peak over CPU time: {peak:.0f} GFLOP/s ({torch.get_num_threads()} threads)")
    for m in (int(r) for r in a.rows.split(",")):
        xs = {k: torch.randn(m, k).to(dtype) for k in {k for _, k in shapes}}  # [M, K]
        gflop = 2 * m * sum(n * k for n, k in shapes) / 1e9

        def ours() -> None:
            for (n, k), p in zip(shapes, packed):
                if bf16:
                    bf16_op(xs[k], p, None, n)
                else:
                    attention_cpu.packed_linear_cpu(xs[k], p, None, n)

        def lib() -> None:
            for (_, k), w, p in zip(shapes, weights, library):
                if bf16:
                    linear(xs[k], w, None, DEFAULT_GEMM_TILE_ROWS, p)
                else:
                    torch.mm(xs[k], w.t())

        for r in range(a.rounds):
            if a.cpu_time:
                peak = max(peak, _fma_peak_cpu_gflops())
            if r % 2 == 0:  # the side that runs first alternates each round
                (t_ours, c_ours), (t_lib, c_lib) = _step_ms(ours, a.repeats), _step_ms(lib, a.repeats)
            else:
                (t_lib, c_lib), (t_ours, c_ours) = _step_ms(lib, a.repeats), _step_ms(ours, a.repeats)
            line = (f"rows {m:4d} round {r}: ours {t_ours:7.1f} ms ({gflop / t_ours * 1e3:6.1f} GFLOP/s) | "
                    f"{name} {t_lib:7.1f} ms ({gflop / t_lib * 1e3:6.1f} GFLOP/s) | "
                    f"ours/library time {t_ours / t_lib:.2f}")
            if a.cpu_time:
                ours_c, lib_c = gflop / c_ours * 1e3, gflop / c_lib * 1e3
                line += (f" || CPU time (peak so far {peak:.0f}): ours {ours_c:6.1f} GFLOP/s ({100 * ours_c / peak:4.1f}%), "
                         f"{name} {lib_c:6.1f} ({100 * lib_c / peak:4.1f}%)")
            print(line, flush=True)


if __name__ == "__main__":
    main()
