"""Weight transfer through vLLM's protocol on gloo (asyncengine/rl), on the default model.

A server process (`asyncengine serve --admin-key`) generates for R streaming requests while
this process, as the trainer (rank 0), sends every tensor of the checkpoint (fp32, 538 MB
for SmolLM2-135M) with start / update_weights / finish, per finish mode. Printed per mode
(median of --repeats): the pause (the engine thread not stepping: the swap at a step
boundary plus the mode's handling), the staging (shadow copy + repack, off the engine
thread, the engine serving meanwhile), and the total (start_weight_update to the finish
answer, as the trainer sees it).

    python bench/weight_transfer.py --repeats 3
"""
from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from api.client import AsyncClient  # noqa: E402
from asyncengine.model_files import resolve_model  # noqa: E402
from asyncengine.models.weights import read_safetensors  # noqa: E402
from asyncengine.rl.loop import ADMIN_KEY, server  # noqa: E402
from asyncengine.rl.sender import WeightSender  # noqa: E402


async def load(client: AsyncClient, n: int, stop: asyncio.Event) -> int:
    """Keep n streaming requests running until stop; the number of tokens received."""
    tokens = 0

    async def one(i: int) -> None:
        nonlocal tokens
        while not stop.is_set():
            async for d in client.stream_complete([1, 2, 3, 4, 5 + i], max_tokens=64, temperature=0.8,
                                                  ignore_eos=True, seed=i):
                tokens += len(d.token_ids)

    await asyncio.gather(*(one(i) for i in range(n)))
    return tokens


async def measure(url: str, state: dict, modes: list[str], repeats: int, requests: int) -> None:
    sender = WeightSender(url, ADMIN_KEY)
    await asyncio.to_thread(sender.init)
    try:
        async with AsyncClient(url) as client:
            stop = asyncio.Event()
            running = asyncio.create_task(load(client, requests, stop))
            await asyncio.sleep(2.0)  # the requests are decoding
            for mode in modes:
                rows = []
                for _ in range(repeats):
                    t0 = time.perf_counter()
                    sender.start()
                    await asyncio.to_thread(sender.broadcast, state)
                    ans = await asyncio.to_thread(sender.request, "POST", "/finish_weight_update", {"mode": mode})
                    rows.append((ans["pause_s"], ans["stage_s"], time.perf_counter() - t0))
                    await asyncio.sleep(0.5)
                p, s, t = (statistics.median(c) for c in zip(*rows))
                print(f"mode {mode:9s} pause {1000 * p:7.2f} ms   staging {1000 * s:6.0f} ms   total {1000 * t:6.0f} ms"
                      f"   (median of {repeats}; pauses {', '.join(f'{1000 * r[0]:.2f}' for r in rows)} ms)",
                      flush=True)
            stop.set()
            print(f"{await running} tokens generated meanwhile by {requests} streams")
    finally:
        sender.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--requests", type=int, default=8)
    p.add_argument("--modes", nargs="+", default=["keep", "abort", "recompute"])
    a = p.parse_args()
    model_dir = resolve_model(a.model)
    state = {k: v.float().contiguous() for k, v in read_safetensors(model_dir).items()}
    print(f"model {model_dir.name}: {len(state)} tensors, {sum(v.numel() * 4 for v in state.values()) / 1e6:.0f} MB fp32")
    with tempfile.TemporaryDirectory() as tmp, server(model_dir, (), Path(tmp) / "server.log") as srv:
        asyncio.run(measure(srv.url, state, a.modes, a.repeats, a.requests))


if __name__ == "__main__":
    main()
