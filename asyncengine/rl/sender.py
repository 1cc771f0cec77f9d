"""The trainer's side of the weight-transfer protocol: `WeightSender(url, admin_key)`.

    sender = WeightSender("http://127.0.0.1:8000", admin_key="KEY")
    sender.init()                     # join the gloo group as rank 0 (the engine joins too)
    version = sender.send(hf_model)   # start, broadcast every tensor, finish: the new version
    sender.close()

Each HTTP call that blocks the server in a collective (init, update_weights) is posted
from a worker thread while this thread runs the matching collective, as TRL does.
"""
from __future__ import annotations

import ctypes
import datetime
import socket
import urllib.error
import urllib.request
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import orjson
import torch
import torch.distributed as dist

from asyncengine.rl.protocol import UpdateInfo
from kernels.huge_pages import empty_bytes

# Our packed buckets: big enough that per-broadcast latency is small against the bytes,
# small enough that packing the next one overlaps this one's broadcast.
DEFAULT_BUCKET_BYTES = 64 << 20

DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16",
               torch.float64: "float64"}


class WeightTransferHTTPError(RuntimeError):
    """The server answered an error (status and its OpenAI-style body)."""

    def __init__(self, path: str, status: int, body: Any) -> None:
        super().__init__(f"{path}: HTTP {status}: {body}")
        self.status, self.body = status, body


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class WeightSender:
    def __init__(self, url: str, admin_key: str | None = None, *, master_address: str = "127.0.0.1",
                 master_port: int | None = None, timeout_s: float = 120.0, packed: bool = True,
                 bucket_bytes: int = DEFAULT_BUCKET_BYTES) -> None:
        self.url = url.rstrip("/")
        self.headers = {"Content-Type": "application/json"}
        if admin_key:
            self.headers["Authorization"] = f"Bearer {admin_key}"
        self.master_address, self.master_port = master_address, master_port
        self.timeout_s = timeout_s
        self._pool = ThreadPoolExecutor(max_workers=1)
        self.packed, self.bucket_bytes = packed, bucket_bytes
        self._packer = ThreadPoolExecutor(max_workers=1)  # packs the next bucket during a broadcast
        self._buffers = [torch.empty(0, dtype=torch.uint8)] * 2  # the two bucket buffers, kept

    # -- HTTP ------------------------------------------------------------------------
    def request(self, method: str, path: str, body: Any = None) -> Any:
        data = orjson.dumps(body) if body is not None else None
        req = urllib.request.Request(self.url + path, data=data, headers=self.headers, method=method)
        try:
            with urllib.request.urlopen(req, timeout=self.timeout_s + 30) as resp:
                return orjson.loads(resp.read())
        except urllib.error.HTTPError as exc:
            raise WeightTransferHTTPError(path, exc.code, exc.read().decode(errors="replace")) from exc

    # -- the protocol ----------------------------------------------------------------
    def init(self) -> None:
        """Join the group as rank 0; the engine(s) join as ranks 1..world_size-1."""
        engines = int(self.request("GET", "/get_world_size")["world_size"])
        port = self.master_port or free_port()
        info = {"master_address": self.master_address, "master_port": port, "rank_offset": 1,
                "world_size": engines + 1}
        posted = self._pool.submit(self.request, "POST", "/init_weight_transfer_engine", {"init_info": info})
        if dist.is_initialized():
            dist.destroy_process_group()
        dist.init_process_group("gloo", init_method=f"tcp://{self.master_address}:{port}", rank=0,
                                world_size=engines + 1, timeout=datetime.timedelta(seconds=self.timeout_s))
        posted.result()

    def start(self) -> None:
        self.request("POST", "/start_weight_update", {})

    def broadcast(self, state: Mapping[str, torch.Tensor], packed: bool | None = None) -> None:
        """Announce the tensors, then broadcast them from rank 0 in the same order: in
        vLLM's packed layout (buckets of `bucket_bytes`) unless packed=False (one
        broadcast per tensor, what a plain trainer does)."""
        tensors = _wire_tensors(state)
        packed = self.packed if packed is None else packed
        info = {"names": list(tensors), "dtype_names": [DTYPE_NAMES[t.dtype] for t in tensors.values()],
                "shapes": [list(t.shape) for t in tensors.values()], "packed": packed}
        if packed:
            info["packed_buffer_size_bytes"] = self.bucket_bytes
        posted = self._pool.submit(self.request, "POST", "/update_weights", {"update_info": info})
        try:
            if packed:
                self._send_buckets(list(tensors.values()), UpdateInfo.parse(info))
            else:
                for t in tensors.values():
                    dist.broadcast(t, src=0)
        except Exception:
            # The server refused (and left the group, which broke our broadcast): its answer says why.
            posted.result()
            raise
        posted.result()

    def _send_buckets(self, tensors: list[torch.Tensor], info: UpdateInfo) -> None:
        """Each bucket's bytes copied into one of two kept buffers and broadcast; the next
        bucket is packed on a worker thread while this one is on the wire."""
        offsets, ends = info.offsets(), [o + n for o, n in zip(info.offsets(), info.sizes())]

        def pack(i: int, a: int, b: int) -> torch.Tensor:
            inside = [(t, o) for t, o, e in zip(tensors, offsets, ends) if a <= o < b and e > o]
            span = _span(inside, b - a)
            if span is not None:  # the bucket's tensors already lie back to back: no copy
                return span
            if len(self._buffers[i % 2]) < b - a:
                self._buffers[i % 2] = empty_bytes(b - a)
            out = self._buffers[i % 2][: b - a]
            for t, o in inside:
                # A plain memcpy (no thread team: torch's parallel copy stalls when the cores
                # are oversubscribed, as they are beside a decoding engine; the GIL is released).
                ctypes.memmove(out.data_ptr() + o - a, t.data_ptr(), t.numel() * t.element_size())
            return out

        buckets = info.buckets()
        nxt = self._packer.submit(pack, 0, *buckets[0]) if buckets else None
        for i in range(len(buckets)):
            assert nxt is not None
            buf = nxt.result()
            nxt = self._packer.submit(pack, i + 1, *buckets[i + 1]) if i + 1 < len(buckets) else None
            dist.broadcast(buf, src=0)

    def finish(self, mode: str = "keep") -> int:
        """Swap the received weights in (at a step boundary); the new weight_version."""
        return int(self.request("POST", "/finish_weight_update", {"mode": mode})["weight_version"])

    def send(self, weights: Mapping[str, torch.Tensor] | torch.nn.Module, mode: str = "keep") -> int:
        """start + broadcast + finish of a state dict or a module's floating-point tensors."""
        state = weights.state_dict() if isinstance(weights, torch.nn.Module) else weights
        self.start()
        self.broadcast({k: v for k, v in state.items() if v.is_floating_point()})
        return self.finish(mode)

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()
        self._pool.shutdown(wait=False)
        self._packer.shutdown(wait=False)
        self._buffers = [torch.empty(0, dtype=torch.uint8)] * 2


def _span(inside: list[tuple[torch.Tensor, int]], nbytes: int) -> torch.Tensor | None:
    """The bytes of tensors (each with its offset in the bucket) as one uint8 view where
    they are back to back in one storage (e.g. views of one flat buffer), else None."""
    if not inside:
        return None
    first, base = inside[0][0], inside[0][1]
    storage = first.untyped_storage().data_ptr()
    if any(t.untyped_storage().data_ptr() != storage or t.data_ptr() - first.data_ptr() != o - base
           for t, o in inside):
        return None
    flat = torch.empty(0, dtype=torch.uint8).set_(first.untyped_storage())
    start = first.data_ptr() - storage
    return flat[start : start + nbytes]


def _wire_tensors(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors to send, contiguous; a tied lm_head (the embedding tensor itself, as in
    an HF state dict) is left out: the engine's tied head is its embedding."""
    tensors = {k: v.detach().contiguous() for k, v in state.items()}
    head, embed = tensors.get("lm_head.weight"), tensors.get("model.embed_tokens.weight")
    if head is not None and embed is not None and head.data_ptr() == embed.data_ptr() and head.shape == embed.shape:
        del tensors["lm_head.weight"]
    return tensors
