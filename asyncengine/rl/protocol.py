"""The bodies of vLLM's weight-transfer protocol (init / update), parsed and checked.

`init_info` = {master_address, master_port, rank_offset, world_size}: the trainer is rank
0 of a torch.distributed group of world_size ranks and this engine is rank rank_offset
(the meaning vLLM's NCCL engine gives it). `update_info` = {names, dtype_names, shapes,
packed?, packed_buffer_size_bytes?, packed_num_buffers?}: the trainer broadcasts, from rank
0 and in this order, one tensor per name; or, with packed=true, vLLM's packed layout: the
tensors' bytes back to back (each row-major in its own dtype), cut into buckets, one uint8
broadcast per bucket. A bucket takes tensors in order until its size passes
packed_buffer_size_bytes (the tensor that passes it is the bucket's last), as vLLM's
packed_tensor module forms them on both sides; packed_num_buffers is how many buckets a
CUDA sender keeps in flight, which does not change the bytes (checked, otherwise unused).
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import math

import torch

DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16,
                                  "float16": torch.float16, "float64": torch.float64}
# vLLM's defaults (packed_tensor.DEFAULT_PACKED_BUFFER_SIZE_BYTES / _NUM_BUFFERS).
DEFAULT_PACKED_BUFFER_SIZE_BYTES = 1 << 30
DEFAULT_PACKED_NUM_BUFFERS = 2


class TransferError(Exception):
    """A refused or failed step of a transfer; `status` is the HTTP status it maps to."""

    def __init__(self, message: str, status: int = 400, code: str = "weight_transfer_error",
                 param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.param = status, code, param


def _field(body: dict[str, Any], name: str, kind: type, where: str) -> Any:
    value = body.get(name)
    if isinstance(value, bool) or not isinstance(value, kind):
        raise TransferError(f"{where}.{name} must be {'a string' if kind is str else 'an integer'}",
                            param=f"{where}.{name}")
    return value


def _positive(body: dict[str, Any], name: str, default: int) -> int:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise TransferError(f"update_info.{name} must be a positive integer, got {value!r}",
                            param=f"update_info.{name}")
    return value


@dataclass(frozen=True, slots=True)
class InitInfo:
    master_address: str
    master_port: int
    rank_offset: int  # this engine's rank in the group (the trainer is rank 0)
    world_size: int

    @classmethod
    def parse(cls, raw: Any) -> InitInfo:
        if not isinstance(raw, dict):
            raise TransferError("init_info must be an object {master_address, master_port, rank_offset, "
                                "world_size}", param="init_info")
        if raw.get("packed", False) not in (False, None):  # packing is per update, in update_info
            raise TransferError("init_info.packed is not a field of init_info: packed=true goes in update_info",
                                param="init_info.packed")
        info = cls(_field(raw, "master_address", str, "init_info"), _field(raw, "master_port", int, "init_info"),
                   _field(raw, "rank_offset", int, "init_info"), _field(raw, "world_size", int, "init_info"))
        if not 0 < info.master_port < 65536:
            raise TransferError("init_info.master_port must be in [1, 65535]", param="init_info.master_port")
        if not 1 <= info.rank_offset < info.world_size:
            raise TransferError(f"init_info.rank_offset must be in [1, world_size) (rank 0 is the trainer); got "
                                f"rank_offset={info.rank_offset}, world_size={info.world_size}",
                                param="init_info.rank_offset")
        return info


@dataclass(frozen=True, slots=True)
class UpdateInfo:
    names: list[str]
    dtypes: list[torch.dtype]
    shapes: list[tuple[int, ...]]
    packed: bool = False
    buffer_size: int = DEFAULT_PACKED_BUFFER_SIZE_BYTES  # packed_buffer_size_bytes
    num_buffers: int = DEFAULT_PACKED_NUM_BUFFERS  # packed_num_buffers (a sender's concern)

    @classmethod
    def parse(cls, raw: Any) -> UpdateInfo:
        if not isinstance(raw, dict):
            raise TransferError("update_info must be an object {names, dtype_names, shapes}", param="update_info")
        names, dtype_names, shapes = raw.get("names"), raw.get("dtype_names"), raw.get("shapes")
        if not (isinstance(names, list) and isinstance(dtype_names, list) and isinstance(shapes, list)):
            raise TransferError("update_info needs lists names, dtype_names and shapes", param="update_info")
        if not len(names) == len(dtype_names) == len(shapes):
            raise TransferError(f"update_info lists differ in length: {len(names)} names, {len(dtype_names)} "
                                f"dtype_names, {len(shapes)} shapes", param="update_info")
        if not all(isinstance(n, str) and n for n in names) or len(set(names)) != len(names):
            raise TransferError("update_info.names must be distinct non-empty strings", param="update_info.names")
        bad = [d for d in dtype_names if d not in DTYPES]
        if bad:
            raise TransferError(f"unsupported dtype {bad[0]!r}; one of {sorted(DTYPES)}",
                                param="update_info.dtype_names")
        for s in shapes:
            if not isinstance(s, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                                  for d in s):
                raise TransferError(f"update_info.shapes entries must be lists of sizes, got {s!r}",
                                    param="update_info.shapes")
        packed = raw.get("packed", False)
        if packed is not None and not isinstance(packed, bool):
            raise TransferError(f"update_info.packed must be a boolean, got {packed!r}", param="update_info.packed")
        return cls(list(names), [DTYPES[d] for d in dtype_names], [tuple(s) for s in shapes], bool(packed),
                   _positive(raw, "packed_buffer_size_bytes", DEFAULT_PACKED_BUFFER_SIZE_BYTES),
                   _positive(raw, "packed_num_buffers", DEFAULT_PACKED_NUM_BUFFERS))

    def sizes(self) -> list[int]:
        """Each tensor's size in bytes."""
        return [math.prod(s) * torch.empty((), dtype=d).element_size() for s, d in zip(self.shapes, self.dtypes)]

    def offsets(self, rank: Mapping[str, int] | None = None) -> list[int]:
        """Each tensor's byte offset when laid back to back: in order (the packed layout),
        or, given a rank per name (the receiver's choice, one broadcast per tensor), in
        rank order (names without a rank last, in order)."""
        sizes = self.sizes()
        order = range(len(self.names))
        if rank is not None and not self.packed:
            order = sorted(order, key=lambda i: (rank.get(self.names[i], len(rank)), i))
        out, at = [0] * len(sizes), 0
        for i in order:
            out[i] = at
            at += sizes[i]
        return out

    def buckets(self) -> list[tuple[int, int]]:
        """The packed broadcasts as [start, end) byte ranges of the back-to-back layout:
        tensors join a bucket until its size passes buffer_size, that tensor included, and
        whatever tensors are left make the last bucket (vLLM's rule, on both sides)."""
        out: list[tuple[int, int]] = []
        start = total = pending = 0
        for size in self.sizes():
            total, pending = total + size, pending + 1
            if total - start > self.buffer_size:
                out.append((start, total))
                start, pending = total, 0
        if pending:
            out.append((start, total))
        return out

    def mismatches(self, expected: dict[str, tuple[int, ...]]) -> list[str]:
        """What does not fit the model: unknown names and wrong shapes (empty when all fit)."""
        out = []
        for name, shape in zip(self.names, self.shapes):
            if name not in expected:
                out.append(f"unknown weight name {name!r}")
            elif shape != expected[name]:
                out.append(f"{name}: shape {list(shape)} does not match the model's {list(expected[name])}")
        return out
