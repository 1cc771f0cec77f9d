"""A trainer process for the weight-transfer tests: rank 0 of the gloo group.

    python -m tests.rl_trainer URL KEY WEIGHTS_DIR SCENARIO [PORT]

Scenarios: ok (send every tensor of WEIGHTS_DIR in vLLM's packed layout, finish),
per_tensor (the same, one broadcast per tensor), small_buckets (packed, buckets of 4 KB),
die (announce all, broadcast half, exit without a word), die_packed (the same in packed
buckets), stall (announce, broadcast nothing, sleep), wrong_shape (send a tensor of the
wrong shape), hold (start, print "started", wait 2 s, send), raw and raw_packed (plain
torch.distributed + urllib, no asyncengine code on the sending side: what an outside
trainer does, one broadcast per tensor or vLLM's packed buckets of 64 KB; it labels the
weights version 7). Prints the finish answer as JSON.
"""
from __future__ import annotations

import datetime
import os
import sys
import threading
import time
import urllib.request

import orjson
import torch
import torch.distributed as dist

from asyncengine.models.weights import read_safetensors
from asyncengine.rl.sender import WeightSender, free_port


def vllm_buckets(tensors: list[torch.Tensor], cap: int) -> list[torch.Tensor]:
    """vLLM's packed_tensor producer, restated: tensors' bytes back to back, a bucket
    closed once its size passes cap (that tensor included), the rest the last bucket."""
    out: list[torch.Tensor] = []
    cur: list[torch.Tensor] = []
    for t in tensors:
        cur.append(t.contiguous().view(-1).view(torch.uint8))
        if sum(c.numel() for c in cur) > cap:
            out.append(torch.cat(cur))
            cur = []
    if cur:
        out.append(torch.cat(cur))
    return out


def raw_trainer(url: str, key: str, state: dict[str, torch.Tensor], packed: bool = False) -> None:
    def post(path: str, body: object) -> object:
        req = urllib.request.Request(url + path, data=orjson.dumps(body), method="POST",
                                     headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as resp:
            return orjson.loads(resp.read())

    port = free_port()
    info = {"master_address": "127.0.0.1", "master_port": port, "rank_offset": 1, "world_size": 2}
    t = threading.Thread(target=post, args=("/init_weight_transfer_engine", {"init_info": info}))
    t.start()
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=2,
                            timeout=datetime.timedelta(seconds=30))
    t.join()
    post("/start_weight_update", {})
    meta = {"names": list(state), "dtype_names": ["float32"] * len(state),
            "shapes": [list(v.shape) for v in state.values()]}
    if packed:
        meta.update(packed=True, packed_buffer_size_bytes=1 << 16, packed_num_buffers=2)
    t = threading.Thread(target=post, args=("/update_weights", {"update_info": meta}))
    t.start()
    chunks = vllm_buckets([v.float() for v in state.values()], 1 << 16) if packed else state.values()
    for v in chunks:
        dist.broadcast(v.contiguous(), src=0)
    t.join()
    print(orjson.dumps(post("/finish_weight_update", {"weight_version": 7})).decode())  # the trainer's label


def main(url: str, key: str, weights: str, scenario: str) -> None:
    state = {k: v.float().contiguous() for k, v in read_safetensors(weights).items()}
    if scenario in ("raw", "raw_packed"):
        return raw_trainer(url, key, state, packed=scenario == "raw_packed")
    sender = WeightSender(url, key, timeout_s=30, packed=scenario != "per_tensor",
                          bucket_bytes=4096 if scenario == "small_buckets" else 64 << 20)
    sender.init()
    if scenario in ("ok", "per_tensor", "small_buckets"):
        sender.start()
        sender.broadcast(state)
        print(orjson.dumps({"weight_version": sender.finish()}).decode())
    elif scenario == "hold":  # start, say so, let the test try a second start, then send
        sender.start()
        print("started", flush=True)
        time.sleep(2.0)
        sender.broadcast(state)
        print(orjson.dumps({"weight_version": sender.finish("recompute")}).decode())
    elif scenario == "wrong_shape":
        name = "model.norm.weight"
        sender.start()
        try:
            sender.broadcast({**state, name: torch.ones(state[name].numel() + 1)})
        except Exception as exc:
            print(orjson.dumps({"error": str(exc)}).decode())
    else:
        sender.start()
        info = {"names": list(state), "dtype_names": ["float32"] * len(state),
                "shapes": [list(v.shape) for v in state.values()]}
        chunks = list(state.values())
        if scenario == "die_packed":
            info.update(packed=True, packed_buffer_size_bytes=4096)
            chunks = vllm_buckets(chunks, 4096)
        sender._pool.submit(sender.request, "POST", "/update_weights", {"update_info": info})
        time.sleep(1.0)  # the engine is now inside update_weights, receiving
        if scenario in ("die", "die_packed"):
            for v in chunks[: len(chunks) // 2]:
                dist.broadcast(v, src=0)
            time.sleep(0.5)
            os._exit(3)  # killed mid-transfer: no goodbye
        time.sleep(6.0)  # stall past the engine's timeout (4 s in the tests)
    sender.close()


if __name__ == "__main__":
    main(*sys.argv[1:5])
