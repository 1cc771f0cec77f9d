"""Data parallelism on one machine: 1 replica x T threads vs T replicas x 1 thread.

Both sides are real `asyncengine serve` processes (the second with `--replicas T`: Ray
actors behind the front) run on the same workload in the same run, alternating: prompts
of random token ids that share one of a few system prefixes (so prefix routing matters),
fixed output length, ignore_eos, seeded sampling, at most C streams in flight. Prints
output tokens/s and the prefix-cache hit rate (hit tokens / queried prompt tokens, from
/metrics) of each, their ratio, and the time of one weight update from the checkpoint
(one server: read + swap; replicas: read once at the front, one object-store put,
pause all -> swap all -> resume all).

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

import orjson  # noqa: E402

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


def _post(url: str, body: bytes = b"") -> float:
    """POST an admin call; return its seconds."""
    import urllib.request

    req = urllib.request.Request(url, method="POST", data=body, headers={
        "Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    t0 = time.perf_counter()
    urllib.request.urlopen(req, timeout=600).close()
    return time.perf_counter() - t0


async def measure(flags: list[str], prompts: list[list[int]], a: argparse.Namespace, log: Path
                  ) -> tuple[float, float, float]:
    """(output tokens/s, prefix hit rate, seconds of one weight update from the checkpoint)."""
    import urllib.request

    model_dir = a.model_dir
    proc, url = server_process.start_server([*flags, "--admin-key", KEY, "--allowed-weights-dir", model_dir], log)
    try:
        await drive(url, prompts[:4], a)  # warm-up (compiles nothing, but pages the weights in)
        # The warm-up cached the prefixes the measured prompts share: drop them, on every replica.
        _post(url + "/reset_prefix_cache")
        with urllib.request.urlopen(url + "/metrics", timeout=30) as r:
            before = r.read().decode()
        secs, tokens = await drive(url, prompts, a)
        with urllib.request.urlopen(url + "/metrics", timeout=30) as r:
            after = r.read().decode()
        update_s = _post(url + "/update_weights", orjson.dumps({"path": model_dir, "mode": "keep"}))
        return tokens / secs, hit_rate(after, before), update_s
    finally:
        proc.terminate()
        proc.wait(60)


def _model_dir(model: str | None) -> str:
    from asyncengine.model_files import resolve_model

    return str(resolve_model(model))


def _vocab_size(model_dir: str) -> int:
    from transformers import AutoConfig

    return int(AutoConfig.from_pretrained(model_dir).vocab_size)


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
    a.model_dir = _model_dir(a.model)
    prompts = make_prompts(a, vocab=_vocab_size(a.model_dir))
    logs = Path(tempfile.mkdtemp(prefix="bench-replicas-"))
    ratios = []
    for r in range(a.rounds):
        order = [("1x%d" % a.threads, one), ("%dx1" % a.threads, many)]
        if r % 2:
            order.reverse()
        got = {}
        for name, flags in order:
            got[name] = asyncio.run(measure(flags, prompts, a, logs / f"{name}-{r}.log"))
            tps, rate, update_s = got[name]
            print(f"round {r + 1} {name:>4}: {tps:7.1f} tok/s, prefix hit rate {rate:.1%}, "
                  f"weight update {update_s * 1e3:.0f} ms", flush=True)
        ratios.append(got["%dx1" % a.threads][0] / got["1x%d" % a.threads][0])
    print(f"replicas / threads tokens/s: {' '.join(f'{x:.2f}' for x in ratios)} (median {statistics.median(ratios):.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
