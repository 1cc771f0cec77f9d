"""Time each kernel op at engine-like shapes (SmolLM2-135M: hidden 576, 9 query heads,
3 KV heads, head dim 64, KV block 16, vocab 49152).

Each op's torch reference against the implementation the engine runs on this device, on
the same inputs: on CUDA the Triton kernels; on CPU the compiled ops of kernels/csrc
(paged attention, RMSNorm, SiLU*up, RoPE + KV store; the sampling ops run torch there).
The Triton interpreter is a correctness tool, so it is never timed; without a CUDA device
this prints that instead of a figure.

    python bench/kernels.py [--repeats 20] [--threads N]
    python bench/kernels.py --decode-bandwidth [--threads N]   # CPU decode attention's KV read rate
    python bench/kernels.py --prefill-attention               # CPU attention of whole prompts, GFLOP/s

--decode-bandwidth: the CPU decode attention of 64 sequences at contexts 512-1024, on caches
laid out as the engine lays them out (kernels.attention_cpu.new_kv_cache; blocks shuffled, as
after churn) and rotated over a 1 GB pool so the keys and values come from memory, not the last-level
cache: bytes of K and V read per second, over wall time and over the calling thread's CPU
time (exact at --threads 1), next to the streaming read rate measured in the same run.
"""
from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere in the repo

from asyncengine.models.llama import silu_mul  # noqa: E402
from kernels import activation, attention, attention_cpu, kv_store, matmul, rmsnorm, rope, sampling  # noqa: E402
from kernels.attention import AttentionMetadata  # noqa: E402

HIDDEN, HEADS, KV_HEADS, HEAD_DIM, BLOCK, VOCAB = 576, 9, 3, 64, 16, 49152
DECODE_BATCH, DECODE_CONTEXT, PREFILL_CHUNK = 64, 512, 512

# op, shape, torch reference, the engine's implementation here (None: torch is it)
Case = tuple[str, str, Callable[[], object], Callable[[], object] | None]


def _time_ms(fn: Callable[[], object], repeats: int, cuda: bool) -> tuple[float, float]:
    """(median, min) wall time of one call in ms, after warm-up calls (the first calls of
    an op pay one-off costs). On a shared machine the min is the steadier figure."""
    for _ in range(3):
        fn()
    samples = []
    for _ in range(repeats):
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples), min(samples)


def _attention_batch(specs: list[tuple[int, int]], device: torch.device, dtype: torch.dtype) -> tuple:
    """(seq_len, q_len) per sequence -> q, caches, metadata; blocks laid out in order."""
    tables, qsl, positions, slots, next_block = [], [0], [], [], 0
    for seq_len, q_len in specs:
        blocks = -(-seq_len // BLOCK)
        tables.append(list(range(next_block, next_block + blocks)))
        next_block += blocks
        qsl.append(qsl[-1] + q_len)
        positions += list(range(seq_len - q_len, seq_len))
        slots += [tables[-1][p // BLOCK] * BLOCK + p % BLOCK for p in range(seq_len - q_len, seq_len)]
    width = max(len(t) for t in tables)
    lens = [s for s, _ in specs]

    def tensor(values: list) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.int64, device=device)

    meta = AttentionMetadata(tensor(qsl), tensor(lens), tensor([t + [0] * (width - len(t)) for t in tables]),
                             tensor(slots), tensor(positions), qsl, lens)
    cache = (next_block, BLOCK, KV_HEADS, HEAD_DIM)
    k_cache = torch.randn(cache, device=device, dtype=dtype)
    v_cache = torch.randn(cache, device=device, dtype=dtype)
    q = torch.randn(qsl[-1], HEADS, HEAD_DIM, device=device, dtype=dtype)
    return q, k_cache, v_cache, meta


def _cases(device: torch.device, dtype: torch.dtype, triton_ok: bool, cpu_ok: bool) -> list[Case]:
    def pick(triton_fn: Callable[[], object] | None, cpu_fn: Callable[[], object] | None = None
             ) -> Callable[[], object] | None:
        return triton_fn if triton_ok else cpu_fn if cpu_ok else None

    def t(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, device=device, dtype=dtype)

    cases: list[Case] = []
    w = t(HIDDEN)
    shapes = ((DECODE_BATCH, f"decode {DECODE_BATCH} tok"), (PREFILL_CHUNK, f"prefill {PREFILL_CHUNK} tok"))
    for tokens, label in shapes:
        x, res = t(tokens, HIDDEN), t(tokens, HIDDEN)
        cases.append(("rms_norm+residual", label, lambda x=x, r=res: rmsnorm.rms_norm_torch(x, w, 1e-5, r),
                      pick(lambda x=x, r=res: rmsnorm.rms_norm_triton(x, w, 1e-5, r),
                           lambda x=x, r=res: attention_cpu.rms_norm_cpu(x, w, 1e-5, r))))
        qkv = t(tokens, (HEADS + 2 * KV_HEADS) * HEAD_DIM)
        q = qkv[:, : HEADS * HEAD_DIM].view(tokens, HEADS, HEAD_DIM)
        k = qkv[:, HEADS * HEAD_DIM : (HEADS + KV_HEADS) * HEAD_DIM].view(tokens, KV_HEADS, HEAD_DIM)
        pos = torch.randint(0, 2048, (tokens,), device=device)
        inv_freq = 1.0 / (100000.0 ** (torch.arange(0, HEAD_DIM, 2).float() / HEAD_DIM))
        cos_sin = rope.rope_cos_sin(inv_freq, 1.0, 2048).to(device)
        kc, vc = t(2048, BLOCK, KV_HEADS, HEAD_DIM), t(2048, BLOCK, KV_HEADS, HEAD_DIM)
        slots = torch.randperm(2048 * BLOCK, device=device)[:tokens]

        def rope_store_torch(q=q, k=k, p=pos, s=slots) -> None:  # type: ignore[no-untyped-def]
            kv_store.store_kv_torch(rope.apply_rope_torch(q, k, p, cos_sin)[1], k, kc, vc, s)

        def rope_store_triton(q=q, k=k, p=pos, s=slots) -> None:  # type: ignore[no-untyped-def]
            kv_store.store_kv_triton(rope.apply_rope_triton(q, k, p, cos_sin)[1], k, kc, vc, s)

        cases.append(("rope+store_kv", label, rope_store_torch,
                      pick(rope_store_triton, lambda q=q, k=k, p=pos, s=slots: attention_cpu.rope_store_kv_cpu(
                          q, k, k, p, cos_sin, kc, vc, s))))
        gate_up = t(tokens, 2 * 1536)
        cases.append(("silu*up (exact)", label, lambda g=gate_up: silu_mul(g, exact=True),
                      pick(lambda g=gate_up: activation.silu_mul_triton(g), lambda g=gate_up: attention_cpu.silu_mul_cpu(g))))
        cases += _linear_cases(tokens, label, t, pick)
    return cases + _attention_cases(device, dtype, pick) + _sampling_cases(device, pick)


def _linear_cases(tokens: int, label: str, t: Callable[..., torch.Tensor], pick: Callable) -> list[Case]:
    """torch's linear (cuBLAS on CUDA) vs the fixed-tile Triton matmul; the fp32 head too."""
    cases: list[Case] = []
    for name, n, k in (("linear qkv", (HEADS + 2 * KV_HEADS) * HEAD_DIM, HIDDEN), ("linear gate_up", 2 * 1536, HIDDEN),
                       ("linear down", HIDDEN, 1536)):
        x, w = t(tokens, k), t(n, k)
        cases.append((name, label, lambda x=x, w=w: matmul.linear_torch(x, w),
                      pick(lambda x=x, w=w: matmul.linear_triton(x, w), None)))
    x, w = t(tokens, HIDDEN).float(), t(VOCAB, HIDDEN).float()
    cases.append(("lm_head fp32", label, lambda: matmul.linear_torch(x, w), pick(lambda: matmul.linear_triton(x, w), None)))
    return cases


def _attention_cases(device: torch.device, dtype: torch.dtype, pick: Callable) -> list[Case]:
    batches = {
        f"decode {DECODE_BATCH} x ctx {DECODE_CONTEXT}": [(DECODE_CONTEXT, 1)] * DECODE_BATCH,
        f"prefill chunk {PREFILL_CHUNK}, no prefix": [(PREFILL_CHUNK, PREFILL_CHUNK)],
        f"prefill chunk {PREFILL_CHUNK} after 512 cached": [(512 + PREFILL_CHUNK, PREFILL_CHUNK)],
        "mixed: chunk 256 + 32 decodes": [(384, 256)] + [(DECODE_CONTEXT, 1)] * 32,
    }
    cases: list[Case] = []
    for label, specs in batches.items():
        q, kc, vc, meta = _attention_batch(specs, device, dtype)
        args = (q, kc, vc, meta, HEAD_DIM**-0.5)
        cases.append(("paged_attention", label, lambda a=args: attention.paged_attention_torch(*a),
                      pick(lambda a=args: attention.paged_attention_triton(*a),
                           lambda a=args: attention_cpu.paged_attention_cpu(*a))))
    return cases


def _sampling_cases(device: torch.device, pick: Callable) -> list[Case]:
    rows = DECODE_BATCH  # no compiled CPU sampling ops: pick(triton) only
    z = torch.randn(rows, VOCAB, device=device) * 3  # logits are fp32 whatever the model dtype
    ids = torch.randint(0, VOCAB, (rows,), device=device)
    top_k = torch.full((rows,), 50, device=device)
    top_p = torch.full((rows,), 0.9, dtype=torch.float64, device=device)
    min_p = torch.zeros(rows, dtype=torch.float64, device=device)
    mask = sampling.support_mask_torch(z, top_k, top_p, min_p)
    label = f"{rows} rows x vocab {VOCAB}"
    return [
        ("log_softmax+top20", label + ", raw", lambda: sampling.log_softmax_topn_torch(z, ids, 20),
         pick(lambda: sampling.log_softmax_topn_triton(z, ids, 20), None)),
        ("log_softmax+top20", label + ", masked", lambda: sampling.log_softmax_topn_torch(z, ids, 20, mask),
         pick(lambda: sampling.log_softmax_topn_triton(z, ids, 20, mask), None)),
        ("support_mask k50 p0.9", label, lambda: sampling.support_mask_torch(z, top_k, top_p, min_p),
         pick(lambda: sampling.support_mask_triton(z, top_k, top_p, min_p), None)),
    ]


def _decode_sets(ctx: int, num_blocks: int) -> list[tuple[AttentionMetadata, torch.Tensor]]:
    """(meta, q) sets of DECODE_BATCH sequences x ctx keys over disjoint blocks of a pool of
    num_blocks, in random order (as after churn); together they cover the pool."""
    per_seq = -(-ctx // BLOCK)
    order = list(range(num_blocks))
    random.Random(ctx).shuffle(order)
    sets = []
    for first in range(0, num_blocks - DECODE_BATCH * per_seq + 1, DECODE_BATCH * per_seq):
        tables = torch.tensor(order[first:first + DECODE_BATCH * per_seq]).view(DECODE_BATCH, per_seq)
        slots = tables[:, (ctx - 1) // BLOCK] * BLOCK + (ctx - 1) % BLOCK
        meta = AttentionMetadata(torch.arange(DECODE_BATCH + 1), torch.full((DECODE_BATCH,), ctx), tables,
                                 slots, torch.full((DECODE_BATCH,), ctx - 1), list(range(DECODE_BATCH + 1)),
                                 [ctx] * DECODE_BATCH)
        sets.append((meta, torch.randn(DECODE_BATCH, HEADS, HEAD_DIM)))
    return sets


def decode_bandwidth(repeats: int, pool_bytes: int = 1 << 30) -> None:
    """The CPU decode attention's KV read rate vs the machine's streaming read rate, on a
    KV pool of pool_bytes (far past the last-level cache) read set after set."""
    if not attention_cpu.available():
        raise SystemExit("the compiled CPU ops are not available")
    ops = torch.ops.asyncengine_cpu
    stream = ops.stream_read(torch.ones(1 << 27))  # 512 MiB
    print(f"{torch.get_num_threads()} threads; streaming read {stream[0] / 1e9:.1f} GB/s over wall time, "
          f"{stream[1] / 1e9:.1f} GB/s over the threads' CPU time")
    for dtype in (torch.float32, torch.bfloat16):
        size = torch.finfo(dtype).bits // 8
        num_blocks = pool_bytes // (2 * BLOCK * KV_HEADS * HEAD_DIM * size)
        k_cache, v_cache = attention_cpu.new_kv_cache(num_blocks, BLOCK, KV_HEADS, HEAD_DIM, dtype)
        k_cache.uniform_(-1, 1), v_cache.uniform_(-1, 1)
        for ctx in (512, 768, 1024):
            sets = _decode_sets(ctx, num_blocks)
            kv_bytes = 2 * DECODE_BATCH * ctx * KV_HEADS * HEAD_DIM * size
            walls, cpus = [], []
            for i in range(-len(sets), repeats * len(sets)):  # one pass over the pool to warm up
                meta, q = sets[i % len(sets)]
                t, c = time.perf_counter(), time.thread_time()
                attention_cpu.paged_attention_cpu(q, k_cache, v_cache, meta, HEAD_DIM**-0.5)
                if i >= 0:
                    walls.append(time.perf_counter() - t)
                    cpus.append(time.thread_time() - c)
            wall, cpu = statistics.median(walls), statistics.median(cpus)
            print(f"{str(dtype).removeprefix('torch.'):<9} {DECODE_BATCH} seqs x ctx {ctx:<5} KV {kv_bytes / 1e6:6.1f} MB: "
                  f"{wall * 1e3:6.2f} ms wall ({kv_bytes / wall / 1e9:5.1f} GB/s, {kv_bytes / wall / stream[0]:4.0%} "
                  f"of streaming), caller's CPU {cpu * 1e3:6.2f} ms ({kv_bytes / cpu / 1e9:5.1f} GB/s, "
                  f"{kv_bytes / cpu / stream[1]:4.0%})", flush=True)
        del k_cache, v_cache


def prefill_attention(repeats: int) -> None:
    """The CPU attention of prompts computed whole (prefill items), on new_kv_cache's layout:
    best time of `repeats` calls, GFLOP/s (QK^T and PV: 4 x d x keys per query row and
    layer, d = heads x head_dim) and the share of the FMA peak measured in the same run."""
    if not attention_cpu.available():
        raise SystemExit("the compiled CPU ops are not available")
    peak = max(torch.ops.asyncengine_cpu.fma_peak_fp32(10_000_000)[1] for _ in range(3))
    print(f"{torch.get_num_threads()} threads; FMA peak {peak / 1e9:.0f} GFLOP/s (fp32, over the threads' CPU time)")
    for dtype in (torch.float32, torch.bfloat16):
        for prompts, length in ((4, 512), (8, 256), (16, 128)):
            blocks = prompts * -(-length // BLOCK)
            k_cache, v_cache = attention_cpu.new_kv_cache(blocks, BLOCK, KV_HEADS, HEAD_DIM, dtype)
            k_cache.uniform_(-1, 1), v_cache.uniform_(-1, 1)
            tables = torch.arange(blocks).view(prompts, -1)
            qsl = list(range(0, (prompts + 1) * length, length))
            positions = torch.arange(length).repeat(prompts)
            meta = AttentionMetadata(torch.tensor(qsl), torch.full((prompts,), length), tables, torch.arange(prompts * length),
                                     positions, qsl, [length] * prompts)
            q = torch.randn(prompts * length, HEADS, HEAD_DIM)
            times = []
            for _ in range(repeats + 1):
                t = time.perf_counter()
                attention_cpu.paged_attention_cpu(q, k_cache, v_cache, meta, HEAD_DIM**-0.5)
                times.append(time.perf_counter() - t)
            best, flops = min(times[1:]), 4 * HEADS * HEAD_DIM * prompts * length * (length + 1) / 2
            print(f"{str(dtype).removeprefix('torch.'):<9} {prompts} prompts x {length:<4} tokens: {best * 1e3:6.2f} ms, "
                  f"{flops / best / 1e9:5.0f} GFLOP/s ({flops / best / peak:4.0%} of the FMA peak)", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--decode-bandwidth", action="store_true",
                        help="only the CPU decode attention's KV read rate vs streaming read (see above)")
    parser.add_argument("--prefill-attention", action="store_true",
                        help="only the CPU attention of whole prompts: GFLOP/s and share of the FMA peak")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.decode_bandwidth:
        return decode_bandwidth(args.repeats)
    if args.prefill_attention:
        return prefill_attention(args.repeats)
    cuda = torch.cuda.is_available()
    triton_ok = cuda and rmsnorm.triton is not None
    device = torch.device("cuda" if cuda else "cpu")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads, device {device}")
    load, cores = os.getloadavg()[0], os.cpu_count() or 1
    if load > cores / 2:  # multi-threaded torch ops stall when their threads get descheduled
        print(f"warning: load average {load:.1f} on {cores} cores; other work competes for the "
              "CPU and these figures overstate the cost (try --threads 1)")
    cpu_ok = not cuda and attention_cpu.available()
    fast = "triton" if triton_ok else "cpu op"
    if not cuda:
        print("No CUDA device exists on this machine: Triton kernels are not timed here "
              "(they are verified under TRITON_INTERPRET=1 in tests/kernels; the interpreter "
              "is not a speed measure). CPU, fp32: torch references vs the compiled CPU ops:")
    dtype = torch.bfloat16 if cuda else torch.float32
    header = f"{'op':<24}{'shape':<40}{'torch ms (median / min)':>24}"
    header += f"{fast + ' ms (median / min)':>26}{'speedup':>9}" if triton_ok or cpu_ok else ""
    print(header)
    print("-" * len(header))
    for op, shape, torch_fn, triton_fn in _cases(device, dtype, triton_ok, cpu_ok):
        med, best = _time_ms(torch_fn, args.repeats, cuda)
        line = f"{op:<24}{shape:<40}{med:>14.3f} / {best:<7.3f}"
        if triton_fn is not None:
            t_med, t_best = _time_ms(triton_fn, args.repeats, cuda)
            line += f"{t_med:>16.3f} / {t_best:<7.3f}{med / t_med:>8.2f}x"
        print(line)

if __name__ == "__main__":
    main()
