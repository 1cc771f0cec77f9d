"""Data parallelism on one machine: 1 replica x T threads vs T replicas x 1 thread.

Both sides are real `asyncengine serve` processes (the second with `--replicas T`: Ray
actors behind the front) run on the same workload in the same run, alternating: prompts
of random token ids that share one of a few system prefixes (so prefix routing matters),
fixed output length, ignore_eos, seeded sampling, at most C streams in flight. Prints
output tokens/s and the prefix-cache hit rate (hit tokens / queried prompt tokens, from
/metrics) of each, and their ratio.

    python bench/replicas.py                          # default model, 2 threads
    python bench/replicas.py --model /path/to/ckpt --num-requests 32 --rounds 2
"""
from __future__ import annotations

import argparse
import asyncio
import random
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import server_process  # noqa: E402  (bench/, beside this script)

from api.client import AsyncClient  # noqa: E402

KEY = "bench-replicas"


def make_prompts(a: argparse.Namespace, vocab: int) -> list[list[int]]:
    rng = random.Random(a.seed)
    prefixes = [[rng.randrange(100, vocab) for _ in range(a.prefix_len)] for _ in range(a.num_prefixes)]
    return [prefixes[i % a.num_prefixes] + [rng.randrange(100, vocab) for _ in range(a.suffix_len)]
            for i in range(a.num_requests)]


async def drive(url: str, prompts: list[list[int]], a: argparse.Namespace) -> tuple[float, int]:
    """Stream every prompt (at most C at once); return (seconds, output tokens)."""
    sem = asyncio.Semaphore(a.concurrency)
    async with AsyncClient(url) as client:
        async def one(i: int, prompt: list[int]) -> int:
            async with sem:
                n = 0
                async for delta in client.stream_complete(prompt, max_tokens=a.output_len, ignore_eos=True,
                                                          temperature=1.0, seed=i):
                    n += len(delta.token_ids)
                return n

        t0 = time.perf_counter()
        counts = await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts)))
        return time.perf_counter() - t0, sum(counts)


def hit_rate(after: str, before: str) -> float:
    """Prefix-cache hit tokens / queried tokens between two /metrics scrapes, summed over
    the engine (one server) or the replicas (the front)."""
    def total(metrics: str, kind: str) -> float:
        return sum(float(v) for v in re.findall(
            rf"^asyncengine_(?:replica_)?prefix_cache_{kind}(?:_total)?(?:{{[^}}]*}})? ([0-9.e+-]+)$", metrics, re.M))

    hits = total(after, "hits") - total(before, "hits")
    queries = total(after, "queries") - total(before, "queries")
    return hits / queries if queries else 0.0


async def measure(flags: list[str], prompts: list[list[int]], a: argparse.Namespace, log: Path) -> tuple[float, float]:
    import urllib.request

    proc, url = server_process.start_server([*flags, "--admin-key", KEY], log)
    try:
        await drive(url, prompts[:4], a)  # warm-up (compiles nothing, but pages the weights in)
        # The warm-up cached the prefixes the measured prompts share: drop them, on every replica.
        reset = urllib.request.Request(url + "/reset_prefix_cache", method="POST", data=b"",
                                       headers={"Authorization": f"Bearer {KEY}"})
        urllib.request.urlopen(reset, timeout=60).close()
        with urllib.request.urlopen(url + "/metrics", timeout=30) as r:
            before = r.read().decode()
        secs, tokens = await drive(url, prompts, a)
        with urllib.request.urlopen(url + "/metrics", timeout=30) as r:
            after = r.read().decode()
        return tokens / secs, hit_rate(after, before)
    finally:
        proc.terminate()
        proc.wait(60)


def _vocab_size(model: str | None) -> int:
    from transformers import AutoConfig

    from asyncengine.model_files import resolve_model

    return int(AutoConfig.from_pretrained(str(resolve_model(model))).vocab_size)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None)
    p.add_argument("--threads", type=int, default=2, help="T: threads of the one replica = replicas of one thread")
    p.add_argument("--num-requests", type=int, default=64)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--num-prefixes", type=int, default=4)
    p.add_argument("--prefix-len", type=int, default=128)
    p.add_argument("--suffix-len", type=int, default=32)
    p.add_argument("--output-len", type=int, default=32)
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    model = ["--model", a.model] if a.model else []
    one = [*model, "--num-threads", str(a.threads)]
    many = [*model, "--replicas", str(a.threads), "--num-cpus-per-replica", "1", "--num-threads", "1"]
    prompts = make_prompts(a, vocab=_vocab_size(a.model))
    logs = Path(tempfile.mkdtemp(prefix="bench-replicas-"))
    ratios = []
    for r in range(a.rounds):
        order = [("1x%d" % a.threads, one), ("%dx1" % a.threads, many)]
        if r % 2:
            order.reverse()
        got = {}
        for name, flags in order:
            got[name] = asyncio.run(measure(flags, prompts, a, logs / f"{name}-{r}.log"))
            print(f"round {r + 1} {name:>4}: {got[name][0]:7.1f} tok/s, prefix hit rate {got[name][1]:.1%}",
                  flush=True)
        ratios.append(got["%dx1" % a.threads][0] / got["1x%d" % a.threads][0])
    print(f"replicas / threads tokens/s: {' '.join(f'{x:.2f}' for x in ratios)} (median {statistics.median(ratios):.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
