"""The trainer's side of the weight-transfer protocol: `WeightSender(url, admin_key)`.

    sender = WeightSender("http://127.0.0.1:8000", admin_key="KEY")
    sender.init()                     # join the gloo group as rank 0 (the engine joins too)
    version = sender.send(hf_model)   # start, broadcast every tensor, finish: the new version
    sender.close()

Each HTTP call that blocks the server in a collective (init, update_weights) is posted
from a worker thread while this thread runs the matching collective, as TRL does.
"""
from __future__ import annotations

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
                 master_port: int | None = None, timeout_s: float = 120.0) -> None:
        self.url = url.rstrip("/")
        self.headers = {"Content-Type": "application/json"}
        if admin_key:
            self.headers["Authorization"] = f"Bearer {admin_key}"
        self.master_address, self.master_port = master_address, master_port
        self.timeout_s = timeout_s
        self._pool = ThreadPoolExecutor(max_workers=1)

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

    def broadcast(self, state: Mapping[str, torch.Tensor]) -> None:
        """Announce the tensors, then broadcast each from rank 0 in the same order."""
        tensors = {k: v.detach().contiguous() for k, v in state.items()}
        info = {"names": list(tensors), "dtype_names": [DTYPE_NAMES[t.dtype] for t in tensors.values()],
                "shapes": [list(t.shape) for t in tensors.values()], "packed": False}
        posted = self._pool.submit(self.request, "POST", "/update_weights", {"update_info": info})
        try:
            for t in tensors.values():
                dist.broadcast(t, src=0)
        except Exception:
            # The server refused (and left the group, which broke our broadcast): its answer says why.
            posted.result()
            raise
        posted.result()

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
