"""Weight-update benchmark on the default model (SmolLM2-135M, ~538 MB of fp32 weights).

Prints, for the same new checkpoint (the default weights scaled by 1.001, saved once):
  1. update latency in process: EngineCore.update_weights(state dict) (the swap alone),
     AsyncEngine.update_weights(state dict) and (safetensors path, read included);
  2. update latency over HTTP against an `asyncengine serve` subprocess started with
     --admin-key / --allowed-weights-dir: POST /update_weights {"path"} and a raw
     safetensors body (application/octet-stream);
  3. generation throughput (AsyncEngine, R requests x L tokens) with an update every N
     engine steps vs none, like for like: the warm-up runs prompts of its own, every
     timed run starts on an empty prefix cache (so no run reuses the prompt KV of another,
     and each computes every prompt token), and the order of the runs rotates each round
     (--rounds); the ratio is each run's median over the no-update median of the same
     process. It measures what a keep-mode swap every N steps costs the rollout stream
     (the swap itself, plus the prompt KV it stops the prefix cache from sharing).

    python bench/weight_update.py
    python bench/weight_update.py --every 8 16 --num-requests 16 --output-len 32 --repeats 2 --rounds 3
"""
from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

# The repo root first: run as a script, bench/ leads sys.path and bench/kernels.py
# would shadow the `kernels` package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import server_process  # noqa: E402  (bench/, beside this script)

import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from asyncengine.async_engine import AsyncEngine  # noqa: E402
from asyncengine.config import EngineConfig  # noqa: E402
from asyncengine.engine_core import EngineCore  # noqa: E402
from asyncengine.model_files import resolve_model  # noqa: E402
from asyncengine.models.weights import read_safetensors  # noqa: E402
from asyncengine.sampling_params import SamplingParams  # noqa: E402

KEY = "bench-key"


def timed(fn: Callable[[], Any], repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


async def atimed(fn: Callable[[], Awaitable[Any]], repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        await fn()
        out.append(time.perf_counter() - t0)
    return out


def report(name: str, secs: list[float]) -> None:
    print(f"  {name:<48} median {statistics.median(secs) * 1e3:8.1f} ms   "
          f"min {min(secs) * 1e3:8.1f} ms   (n={len(secs)})", flush=True)


# -- 1. in process ------------------------------------------------------------------------
async def in_process(config: EngineConfig, state: dict[str, torch.Tensor], path: Path, repeats: int) -> None:
    print("in process:")
    core = EngineCore(config)
    report("EngineCore.update_weights(state dict)", timed(lambda: core.update_weights(state), repeats))
    eng = AsyncEngine(core)
    try:
        report("AsyncEngine.update_weights(state dict)", await atimed(lambda: eng.update_weights(state), repeats))
        report("AsyncEngine.update_weights(safetensors path)", await atimed(lambda: eng.update_weights(path), repeats))
        report("AsyncEngine.weight_checksums()", await atimed(eng.weight_checksums, 1))
    finally:
        eng.shutdown()


# -- 2. HTTP ------------------------------------------------------------------------------
def start_server(model_dir: Path, allowed: Path, log: Path) -> tuple[subprocess.Popen[bytes], str]:
    flags = ["--model", str(model_dir), "--admin-key", KEY, "--allowed-weights-dir", str(allowed)]
    return server_process.start_server(flags, log)


def post(url: str, data: bytes, content_type: str) -> bytes:
    req = urllib.request.Request(url, data=data, method="POST", headers={
        "Authorization": f"Bearer {KEY}", "Content-Type": content_type})
    with urllib.request.urlopen(req, timeout=600) as resp:
        return resp.read()


def over_http(model_dir: Path, path: Path, repeats: int) -> None:
    print("over HTTP (server subprocess):")
    with tempfile.TemporaryDirectory() as tmp:
        proc, url = start_server(model_dir, path.parent, Path(tmp) / "server.log")
        try:
            body = f'{{"path": "{path.name}", "mode": "keep"}}'.encode()
            report("POST /update_weights {path}", timed(lambda: post(url + "/update_weights", body,
                                                                      "application/json"), repeats))
            blob = path.read_bytes()
            report(f"POST /update_weights octet-stream ({len(blob) / 2**20:.0f} MB)",
                   timed(lambda: post(url + "/update_weights?mode=keep", blob, "application/octet-stream"), 1))
        finally:
            proc.terminate()
            proc.wait(30)


# -- 3. throughput under updates ------------------------------------------------------------
async def generate_all(eng: AsyncEngine, n: int, length: int, first_token: int = 100) -> int:
    """n requests of 64-token prompts (ids first_token + i ...) x `length` tokens."""
    async def one(i: int) -> int:
        sp = SamplingParams(max_tokens=length, ignore_eos=True, temperature=1.0, seed=i)
        prompt = list(range(first_token + i, first_token + 64 + i))
        return sum([len(o.token_ids) async for o in eng.generate(prompt, sp)])

    return sum(await asyncio.gather(*(one(i) for i in range(n))))


async def throughput(eng: AsyncEngine, state: dict[str, torch.Tensor], every: int | None, n: int,
                     length: int) -> float:
    """One timed run from an empty prefix cache; returns output tokens per second."""
    await eng.reset_prefix_cache()
    updates = 0

    async def updater() -> None:
        nonlocal updates
        next_at = eng.num_steps + every if every else None
        while next_at is not None:
            if eng.num_steps >= next_at:
                await eng.update_weights(state, "keep")
                updates += 1
                next_at = eng.num_steps + every
            await asyncio.sleep(0.001)

    task = asyncio.create_task(updater())
    t0, steps0 = time.perf_counter(), eng.num_steps
    tokens = await generate_all(eng, n, length)
    secs = time.perf_counter() - t0
    task.cancel()
    label = f"update every {every} steps" if every else "no updates"
    print(f"  {label:<24} {tokens / secs:7.1f} tok/s   {secs:6.2f} s   {eng.num_steps - steps0} steps   "
          f"{updates} updates", flush=True)
    return tokens / secs


async def throughput_rounds(eng: AsyncEngine, state: dict[str, torch.Tensor], every: list[int], n: int,
                            length: int, rounds: int) -> None:
    runs: list[int | None] = [None, *every]
    rates: dict[int | None, list[float]] = {e: [] for e in runs}
    for r in range(rounds):
        for e in runs[r % len(runs):] + runs[: r % len(runs)]:  # each run leads in turn
            rates[e].append(await throughput(eng, state, e, n, length))
    base = statistics.median(rates[None])
    for e in every:
        print(f"  update every {e} steps: median {statistics.median(rates[e]):7.1f} tok/s = "
              f"{statistics.median(rates[e]) / base:.3f}x of no updates ({base:.1f} tok/s), {rounds} rounds")


async def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--every", type=int, nargs="+", default=[16, 64])
    p.add_argument("--num-requests", type=int, default=32)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--rounds", type=int, default=2, help="timed runs of each setting, in rotating order")
    a = p.parse_args()
    model_dir = resolve_model(None)
    config = EngineConfig(model=str(model_dir))
    state = {k: v * 1.001 for k, v in read_safetensors(model_dir).items()}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "allowed" / "model.safetensors"
        path.parent.mkdir()
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
        print(f"model {model_dir.name}: {sum(t.numel() for t in state.values()):,} params, "
              f"{path.stat().st_size / 2**20:.0f} MB safetensors; torch threads {torch.get_num_threads()}")
        await in_process(config, state, path, a.repeats)
        over_http(model_dir, path, a.repeats)
    print(f"throughput, {a.num_requests} requests x {a.output_len} tokens (64-token prompts):")
    eng = AsyncEngine.from_config(config)
    try:
        await generate_all(eng, 4, 4, first_token=20000)  # warm-up, on prompts no timed run uses
        await throughput_rounds(eng, state, a.every, a.num_requests, a.output_len, a.rounds)
    finally:
        eng.shutdown()


if __name__ == "__main__":
    asyncio.run(main())
