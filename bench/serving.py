"""Serving benchmark: concurrent SSE clients against a real `asyncengine serve` process.

Runs one workload (random token-id prompts, fixed output length, ignore_eos, seeded
sampling) three ways in the same run and prints output tokens/s for each:
  1. HTTP: N streaming clients (at most C in flight) against a server subprocess,
     with time-to-first-token and inter-token latency p50/p99;
  2. in-process EngineCore stepping the same requests (C in flight), the baseline;
  3. in-process AsyncEngine (the actor without HTTP), to split the overhead.
The figure of merit is served tokens/s / in-process tokens/s (target >= 0.9).

    python bench/serving.py                       # default model, 64 requests, 32 in flight
    python bench/serving.py --num-requests 16 --output-len 32 --model /path/to/ckpt
"""
from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

# The repo root first: run as a script, bench/ leads sys.path and bench/kernels.py
# would shadow the `kernels` package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import server_process  # noqa: E402  (bench/, beside this script)

from api.client import AsyncClient  # noqa: E402
from asyncengine.cli import add_engine_args, config_from_args  # noqa: E402
from asyncengine.config import EngineConfig  # noqa: E402
from asyncengine.engine_core import EngineCore  # noqa: E402
from asyncengine.sampling_params import SamplingParams  # noqa: E402


@dataclass(slots=True)
class Workload:
    prompts: list[list[int]]
    output_len: int
    concurrency: int

    def params(self, i: int) -> SamplingParams:
        return SamplingParams(max_tokens=self.output_len, ignore_eos=True, temperature=1.0, seed=i)


@dataclass(slots=True)
class Trace:
    """Arrival times of one streamed request."""

    start: float
    first: float | None = None
    token_times: list[float] = field(default_factory=list)


def make_workload(a: argparse.Namespace, round_index: int, vocab_size: int) -> Workload:
    rng = random.Random(a.workload_seed * 1_000_003 + round_index)
    # Token ids past the special tokens at the start of the vocabulary.
    prompts = [[rng.randrange(100, vocab_size) for _ in range(rng.randint(a.min_prompt_len, a.max_prompt_len))]
               for _ in range(a.num_requests)]
    return Workload(prompts, a.output_len, a.concurrency)


# -- 1. HTTP ------------------------------------------------------------------------------
def engine_flags(a: argparse.Namespace) -> list[str]:
    """The engine options of this run as `asyncengine serve` flags (non-defaults only)."""
    p = argparse.ArgumentParser()
    add_engine_args(p)
    flags: list[str] = []
    for action in p._actions:
        value = getattr(a, action.dest, None)
        if not action.option_strings or action.dest == "help" or value == action.default:
            continue
        flags += [action.option_strings[0]] if action.nargs == 0 else [action.option_strings[0], str(value)]
    return flags


def start_server(a: argparse.Namespace, log: Path) -> tuple[subprocess.Popen[bytes], str]:
    return server_process.start_server(engine_flags(a), log)


async def run_http(url: str, w: Workload) -> tuple[float, list[Trace]]:
    """N streaming requests, at most C in flight; returns (seconds, traces)."""
    gate = asyncio.Semaphore(w.concurrency)
    traces: list[Trace] = []

    async def one(client: AsyncClient, i: int) -> None:
        sp = w.params(i)
        async with gate:
            trace = Trace(start=time.perf_counter())
            traces.append(trace)
            async for delta in client.stream_complete(w.prompts[i], max_tokens=sp.max_tokens, ignore_eos=True,
                                                      temperature=sp.temperature, seed=sp.seed):
                now = time.perf_counter()
                if delta.token_ids and trace.first is None:
                    trace.first = now
                trace.token_times += [now] * len(delta.token_ids)

    async with AsyncClient(url, max_connections=w.concurrency + 8) as client:
        t0 = time.perf_counter()
        await asyncio.gather(*(one(client, i) for i in range(len(w.prompts))))
        return time.perf_counter() - t0, traces


# -- 2. and 3. in process -----------------------------------------------------------------
def run_core(core: EngineCore, w: Workload, tag: str) -> tuple[float, int]:
    """EngineCore stepping the workload with at most C requests in flight: (seconds, tokens)."""
    t0, tokens, next_i, in_flight = time.perf_counter(), 0, 0, 0
    while next_i < len(w.prompts) or in_flight:
        while next_i < len(w.prompts) and in_flight < w.concurrency:
            core.add_request(f"{tag}-{next_i}", w.prompts[next_i], w.params(next_i))
            next_i, in_flight = next_i + 1, in_flight + 1
        for out in core.step():
            tokens += len(out.token_ids)
            in_flight -= out.finished
    return time.perf_counter() - t0, tokens


async def run_async_engine(core: EngineCore, w: Workload) -> tuple[float, int]:
    """The same through AsyncEngine (which owns `core` until shutdown)."""
    from asyncengine.async_engine import AsyncEngine

    engine = AsyncEngine(core)
    gate = asyncio.Semaphore(w.concurrency)
    counts: list[int] = []

    async def one(i: int) -> None:
        async with gate:
            counts.append(sum([len(o.token_ids) async for o in engine.generate(w.prompts[i], w.params(i))], 0))

    try:
        t0 = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(len(w.prompts))))
        return time.perf_counter() - t0, sum(counts)
    finally:
        engine.shutdown()


# -- report -------------------------------------------------------------------------------
def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * (len(xs) - 1) + 0.5))] if xs else float("nan")


@dataclass(slots=True)
class Round:
    http: tuple[float, list[Trace]]
    core: tuple[float, int]
    actor: tuple[float, int]

    @property
    def served(self) -> float:
        return sum(len(t.token_times) for t in self.http[1]) / self.http[0]

    @property
    def base(self) -> float:
        return self.core[1] / self.core[0]


def report(w: Workload, rounds: list[Round]) -> None:
    lens = [len(p) for p in w.prompts]
    print(f"\nworkload: {len(w.prompts)} requests, {w.concurrency} in flight, prompts {min(lens)}-{max(lens)} "
          f"tokens (mean {sum(lens) / len(lens):.0f}), {w.output_len} output tokens each (ignore_eos)")
    print(f"{'round':>5}{'HTTP tok/s':>12}{'EngineCore':>12}{'AsyncEngine':>13}{'served/core':>13}")
    for i, r in enumerate(rounds):
        actor = r.actor[1] / r.actor[0]
        print(f"{i:>5}{r.served:>12.1f}{r.base:>12.1f}{actor:>13.1f}{r.served / r.base:>13.3f}")
    traces = [t for r in rounds for t in r.http[1]]
    ttft = [t.first - t.start for t in traces if t.first is not None]
    itl = [b - a for t in traces for a, b in zip(t.token_times, t.token_times[1:])]
    print(f"TTFT  p50 {pct(ttft, 0.5) * 1e3:8.1f} ms   p99 {pct(ttft, 0.99) * 1e3:8.1f} ms")
    print(f"ITL   p50 {pct(itl, 0.5) * 1e3:8.1f} ms   p99 {pct(itl, 0.99) * 1e3:8.1f} ms")
    ratios = sorted(r.served / r.base for r in rounds)
    median = statistics.median(ratios)
    served = sum(r.served for r in rounds) / len(rounds)
    base = sum(r.base for r in rounds) / len(rounds)
    print(f"served {served:.1f} tok/s, in-process {base:.1f} tok/s (means); "
          f"served / in-process: median {median:.3f}, min {ratios[0]:.3f}, max {ratios[-1]:.3f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_engine_args(p)
    p.add_argument("--num-requests", type=int, default=64)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--min-prompt-len", type=int, default=32)
    p.add_argument("--max-prompt-len", type=int, default=256)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--rounds", type=int, default=2, help="alternate HTTP and in-process runs this many times")
    p.add_argument("--workload-seed", type=int, default=0)
    a = p.parse_args()
    config = config_from_args(a)
    log = Path(tempfile.mkdtemp()) / "server.log"
    proc, url = start_server(a, log)
    print(f"server up at {url} (log: {log})", flush=True)
    try:
        report(*run_rounds(a, config, url))
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def run_rounds(a: argparse.Namespace, config: EngineConfig, url: str) -> tuple[Workload, list[Round]]:
    """Alternate the phases so that load from other processes hits them alike; each round
    has fresh prompts (no prefix-cache hits from the previous round, on either side)."""
    core = EngineCore(config)  # the server is idle meanwhile (its engine thread sleeps)
    warm = make_workload(a, 10_000, core.model_info.vocab_size)
    warm.prompts, warm.output_len = warm.prompts[:2], 4
    run_core(core, warm, "warmup")
    asyncio.run(run_http(url, warm))
    rounds = []
    for r in range(a.rounds):
        w = make_workload(a, r, core.model_info.vocab_size)
        print(f"round {r}: HTTP ...", flush=True)
        http = asyncio.run(run_http(url, w))
        print(f"round {r}: in-process EngineCore ...", flush=True)
        base = run_core(core, w, f"r{r}")
        print(f"round {r}: in-process AsyncEngine ...", flush=True)
        core.reset_prefix_cache()
        actor = asyncio.run(run_async_engine(core, w))
        core.reset_prefix_cache()
        rounds.append(Round(http, base, actor))
    return make_workload(a, 0, core.model_info.vocab_size), rounds


if __name__ == "__main__":
    main()
