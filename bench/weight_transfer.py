"""Weight transfer through vLLM's protocol on gloo (asyncengine/rl), on the default model.

A server process (`asyncengine serve --admin-key`) generates for R streaming requests while
this process, as the trainer (rank 0), sends every tensor of the checkpoint (fp32, 538 MB
for SmolLM2-135M) with start / update_weights / finish, per transport (vLLM's packed
layout, or one broadcast per tensor) and finish mode. Printed per row (median of
--repeats): the pause (the engine thread not stepping: the swap at a step boundary plus
the mode's handling), the receive (the server inside update_weights: the broadcasts),
the staging (finite check + GEMM packing into kept buffers, off the engine thread, the
engine serving meanwhile), the finish call as the trainer sees it (staging + pause +
HTTP), and the total (start_weight_update to the finish answer, as the trainer sees it).

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


ROW = "{:<10} {:<9} {:>9} {:>10} {:>10} {:>9} {:>9}   {}"


async def one_update(sender: WeightSender, state: dict, mode: str, packed: bool) -> tuple[float, ...]:
    """One start / update_weights / finish: (pause, receive, staging, finish call, total) in s."""
    t0 = time.perf_counter()
    await asyncio.to_thread(sender.start)
    await asyncio.to_thread(sender.broadcast, state, packed)
    t1 = time.perf_counter()
    ans = await asyncio.to_thread(sender.request, "POST", "/finish_weight_update", {"mode": mode})
    t2 = time.perf_counter()
    return ans["pause_s"], ans["receive_s"], ans["stage_s"], t2 - t1, t2 - t0


async def measure(url: str, state: dict, modes: list[str], transports: list[str], repeats: int,
                  requests: int) -> None:
    sender = WeightSender(url, ADMIN_KEY)
    await asyncio.to_thread(sender.init)
    try:
        async with AsyncClient(url) as client:
            stop = asyncio.Event()
            running = asyncio.create_task(load(client, requests, stop))
            await asyncio.sleep(2.0)  # the requests are decoding
            # Two warm-up updates: the engine's two sets of kept buffers are allocated (and
            # faulted in) by the first two updates, which are slower; every later one reuses them.
            for i in range(2):
                first = await one_update(sender, state, "keep", transports[0] == "packed")
                print(f"warm-up update {i + 1} (allocates a set of staging buffers): total {1000 * first[-1]:.0f} ms")
            print(ROW.format("transport", "mode", "pause ms", "receive ms", "staging ms", "finish ms", "total ms",
                             f"(median of {repeats}; the pauses)"))
            for mode in modes:
                for transport in transports:
                    rows = []
                    for _ in range(repeats):
                        rows.append(await one_update(sender, state, mode, transport == "packed"))
                        await asyncio.sleep(0.5)
                    med = [statistics.median(c) for c in zip(*rows)]
                    print(ROW.format(transport, mode, *(f"{1000 * v:.1f}" if i == 0 else f"{1000 * v:.0f}"
                                                        for i, v in enumerate(med)),
                                     ", ".join(f"{1000 * r[0]:.1f}" for r in rows)), flush=True)
            stop.set()
            print(f"{await running} tokens generated meanwhile by {requests} streams")
    finally:
        sender.close()


# An HF model's state_dict order within a layer (what a trainer's named_parameters gives).
HF_ORDER = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
            "mlp.up_proj", "mlp.down_proj", "input_layernorm", "post_attention_layernorm")


def module_order(name: str) -> tuple[int, int, str]:
    parts = name.split(".")
    if len(parts) > 3 and parts[1] == "layers":
        rest = ".".join(parts[3:5])
        return int(parts[2]) + 1, HF_ORDER.index(rest) if rest in HF_ORDER else len(HF_ORDER), name
    return (0 if "embed" in name else 10**6), 0, name


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--requests", type=int, default=8)
    p.add_argument("--modes", nargs="+", default=["keep", "abort", "recompute"])
    p.add_argument("--transports", nargs="+", default=["packed", "per-tensor"], choices=["packed", "per-tensor"],
                   help="packed: vLLM's packed layout (what WeightSender sends); per-tensor: one broadcast "
                        "per tensor (what a plain trainer sends)")
    a = p.parse_args()
    model_dir = resolve_model(a.model)
    # The checkpoint's tensors in the order a trainer's HF model holds them (the file's is alphabetical).
    state = {k: v.float().contiguous() for k, v in sorted(read_safetensors(model_dir).items(),
                                                          key=lambda kv: module_order(kv[0]))}
    print(f"model {model_dir.name}: {len(state)} tensors, {sum(v.numel() * 4 for v in state.values()) / 1e6:.0f} MB fp32")
    with tempfile.TemporaryDirectory() as tmp, server(model_dir, (), Path(tmp) / "server.log") as srv:
        asyncio.run(measure(srv.url, state, a.modes, a.transports, a.repeats, a.requests))


if __name__ == "__main__":
    main()
