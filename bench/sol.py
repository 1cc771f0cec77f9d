"""The speed of light of a generation workload on this machine.

The machine's limits are measured in the same run by compiled probes
(kernels/csrc/sol_probe_cpu.cpp, on every intra-op thread): the fp32 FMA peak of a
register-only FMA loop (AVX-512, else AVX2), the bf16 dot-product peak (AMX tiles where
the CPU has them, else VDPBF16PS, else the fp32 peak), and the streaming read bandwidth
of a buffer far larger than the caches. Each probe runs a few times and its best figure
counts: the machine is shared, and the limit is what it reaches unhindered.

A workload's speed of light is the sum over idealized steps of max(compute time, memory
time). Steps: the prompts in order, chunked into steps of the token budget (chunked
prefill), then one decode step per further token with every sequence (up to max_num_seqs
at once). FLOPs are counted exactly per token: 2 x the body's matmul parameters, attention
4 x d x context per layer (QK^T and PV, d = heads x head_dim, context = the keys it
attends, itself included), and the head's 2 x vocab x hidden only for tokens that produce
logits (the last prompt token and each decode token). Body FLOPs run at the body dtype's
peak; attention and the head (fp32 here) at the fp32 peak. Bytes per step: every matmul
weight once, the KV of each scheduled sequence's context, and the new tokens' KV writes.

The speed of light takes attention's KV reads as hidden under the FMAs. On a core with one
hardware thread they are not, by themselves: software would have to hint them in under
the GEMMs' arithmetic, which bench/overlap.py measures. So a second bound is printed
next to it, kv_hidden=False: per step compute time plus the time to stream the cached KV
(the weights stay under the FMAs, as the GEMMs' own hints keep them).
"""
from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

# Imported from a script in bench/, bench/ leads sys.path and bench/kernels.py would shadow `kernels`.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kernels import attention_cpu  # noqa: E402

_FMA_ITERS = 10_000_000  # ~0.1-0.2 s per probe on 2 cores
_READ_FLOATS = 1 << 27  # 512 MiB: far larger than any last-level cache here


@dataclass(frozen=True, slots=True)
class Machine:
    """Rates over the probe threads' own CPU time (what the cores do while ours hold
    them; the SOL uses these), and over wall time (lower where others share the cores)."""

    fp32_flops: float  # FLOP/s, register-only FMA loop on every thread
    bf16_flops: float  # FLOP/s of the best bf16 dot-product unit (the fp32 peak if none)
    bf16_unit: str  # "amx", "avx512-bf16" or "none"
    read_bytes: float  # bytes/s, streaming read
    wall: tuple[float, float, float]  # the same three rates over wall time

    def describe(self) -> str:
        w = self.wall
        return (f"FMA peak fp32 {self.fp32_flops / 1e9:.0f} GFLOP/s, bf16 ({self.bf16_unit}) "
                f"{self.bf16_flops / 1e9:.0f} GFLOP/s, streaming read {self.read_bytes / 1e9:.1f} GB/s "
                f"over the probes' CPU time ({torch.get_num_threads()} threads); over wall time "
                f"{w[0] / 1e9:.0f}, {w[1] / 1e9:.0f} GFLOP/s, {w[2] / 1e9:.1f} GB/s")


def faster(a: Machine, b: Machine) -> Machine:
    """Each rate at the higher of two probings: a probe that ran while the host was slow
    (this one's speed drifts by tens of percent) would set a speed of light too low and
    a fraction of it too high; the higher rate only ever lowers our fraction."""
    return Machine(max(a.fp32_flops, b.fp32_flops), max(a.bf16_flops, b.bf16_flops), a.bf16_unit,
                   max(a.read_bytes, b.read_bytes),
                   (max(a.wall[0], b.wall[0]), max(a.wall[1], b.wall[1]), max(a.wall[2], b.wall[2])))


def _best(probe: Callable[[], tuple[float, float]], reps: int) -> tuple[float, float]:
    """The best (wall, CPU-time) rates of `reps` runs."""
    runs = [probe() for _ in range(reps)]
    return max(r[0] for r in runs), max(r[1] for r in runs)


def measure_machine(reps: int = 5) -> Machine:
    """The best of `reps` runs of each probe; raises SystemExit without the compiled ops."""
    if not attention_cpu.available():
        raise SystemExit("the compiled CPU ops are not available (no C++ compiler?): no FMA probe")
    ops = torch.ops.asyncengine_cpu
    fp32 = _best(lambda: ops.fma_peak_fp32(_FMA_ITERS), reps)
    unit, bf16 = "none", fp32
    if ops.amx_available():
        unit, bf16 = "amx", _best(lambda: ops.amx_peak_bf16(_FMA_ITERS // 8), reps)
    elif ops.avx512_bf16_available():
        unit, bf16 = "avx512-bf16", _best(lambda: ops.dot_peak_bf16(_FMA_ITERS), reps)
    buf = torch.ones(_READ_FLOATS)  # touched, so the probe reads resident pages
    read = _best(lambda: ops.stream_read(buf), reps)
    return Machine(fp32[1], max(bf16[1], fp32[1]), unit, read[1], (fp32[0], max(bf16[0], fp32[0]), read[0]))


@dataclass(frozen=True, slots=True)
class ModelCost:
    """What one token costs in the engine's model."""

    layers: int
    attn_dim: int  # d = num_heads x head_dim
    body_params: int  # matmul parameters of the transformer body
    head_params: int  # vocab x hidden
    weight_bytes: int  # every matmul weight as stored, read once per step
    kv_token_bytes: int  # K and V of one token over all layers
    body_bf16: bool
    head_bf16: bool

    @classmethod
    def of(cls, llm: object) -> ModelCost:
        engine = llm.engine  # type: ignore[attr-defined]
        model, args, config = engine.model, engine.model.args, engine.config
        *body, head = model.gemm_weights()
        kv_elt = torch.empty((), dtype=torch.bfloat16 if config.dtype == "bfloat16" else torch.float32).element_size()
        return cls(
            layers=args.num_layers, attn_dim=args.num_heads * args.head_dim,
            body_params=sum(w.numel() for w in body), head_params=head.numel(),
            weight_bytes=sum(w.numel() * w.element_size() for w in (*body, head)),
            kv_token_bytes=args.num_layers * 2 * args.num_kv_heads * args.head_dim * kv_elt,
            body_bf16=body[0].dtype == torch.bfloat16, head_bf16=head.dtype == torch.bfloat16,
        )


def _step_seconds(cost: ModelCost, m: Machine, tokens: int, ctx_sum: int, logits: int, kv_read: int,
                  kv_hidden: bool = True) -> float:
    """max(compute, memory) of one step: `tokens` computed, attending `ctx_sum` keys in all,
    `logits` rows through the head, `kv_read` cached tokens' KV read; kv_hidden=False adds
    that read's streaming time to the compute."""
    body = 2 * cost.body_params * tokens / (m.bf16_flops if cost.body_bf16 else m.fp32_flops)
    head = 2 * cost.head_params * logits / (m.bf16_flops if cost.head_bf16 else m.fp32_flops)
    attn = 4 * cost.attn_dim * cost.layers * ctx_sum / m.fp32_flops
    memory = (cost.weight_bytes + (kv_read + tokens) * cost.kv_token_bytes) / m.read_bytes
    kv = 0.0 if kv_hidden else kv_read * cost.kv_token_bytes / m.read_bytes
    return max(body + head + attn + kv, memory)


def _prefill_seconds(cost: ModelCost, m: Machine, lengths: list[int], budget: int, kv_hidden: bool) -> float:
    total, step = 0.0, [0, 0, 0, 0]  # tokens, ctx_sum, logits, kv_read of the step being filled
    for length in lengths:
        start = 0
        while start < length:
            end = min(length, start + budget - step[0])
            step[0] += end - start
            step[1] += (end * (end + 1) - start * (start + 1)) // 2  # keys attended by positions start..end-1
            step[2] += end == length
            step[3] += start  # this chunk reads the prompt's KV cached by earlier chunks
            start = end
            if step[0] == budget:
                total += _step_seconds(cost, m, *step, kv_hidden)
                step = [0, 0, 0, 0]
    return total + (_step_seconds(cost, m, *step, kv_hidden) if step[0] else 0.0)


def sol_seconds(cost: ModelCost, m: Machine, lengths: list[int], new_tokens: int, budget: int,
                max_seqs: int, kv_hidden: bool = True) -> float:
    """The speed of light (seconds) of prompts of `lengths`, each generating `new_tokens`
    (kv_hidden=False: the bound with the KV reads not under the FMAs, see above)."""
    total = _prefill_seconds(cost, m, lengths, budget, kv_hidden)  # also yields each prompt's first token
    for g in range(0, len(lengths), max_seqs):
        group = lengths[g : g + max_seqs]
        for j in range(1, new_tokens):  # the token fed at position p + j - 1 attends p + j keys
            ctx = sum(group) + j * len(group)
            total += _step_seconds(cost, m, len(group), ctx, len(group), ctx - len(group), kv_hidden)
    return total


def decode_sol_seconds(cost: ModelCost, m: Machine, lengths: list[int], new_tokens: int) -> float:
    """The speed of light (seconds) of the decode steps alone of prompts of `lengths` decoding
    together (one batch): the tokens after each prompt's first, as in sol_seconds."""
    total = 0.0
    for j in range(1, new_tokens):  # the token fed at position p + j - 1 attends p + j keys
        ctx = sum(lengths) + j * len(lengths)
        total += _step_seconds(cost, m, len(lengths), ctx, len(lengths), ctx - len(lengths))
    return total
