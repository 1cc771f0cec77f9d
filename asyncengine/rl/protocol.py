"""The bodies of vLLM's weight-transfer protocol (init / update), parsed and checked.

`init_info` = {master_address, master_port, rank_offset, world_size}: the trainer is rank
0 of a torch.distributed group of world_size ranks and this engine is rank rank_offset
(the meaning vLLM's NCCL engine gives it). `update_info` = {names, dtype_names, shapes}:
the trainer broadcasts, from rank 0 and in this order, one tensor per name.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16,
                                  "float16": torch.float16, "float64": torch.float64}


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


def _packed(body: dict[str, Any], where: str) -> None:
    if body.get("packed", False) not in (False, None):
        raise TransferError(f"{where}.packed=true (vLLM's packed NCCL layout) is not supported by the gloo "
                            "transport: broadcast one tensor per name with packed=false",
                            param=f"{where}.packed", code="packed_not_supported")


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
        _packed(raw, "init_info")
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

    @classmethod
    def parse(cls, raw: Any) -> UpdateInfo:
        if not isinstance(raw, dict):
            raise TransferError("update_info must be an object {names, dtype_names, shapes}", param="update_info")
        _packed(raw, "update_info")
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
        return cls(list(names), [DTYPES[d] for d in dtype_names], [tuple(s) for s in shapes])

    def mismatches(self, expected: dict[str, tuple[int, ...]]) -> list[str]:
        """What does not fit the model: unknown names and wrong shapes (empty when all fit)."""
        out = []
        for name, shape in zip(self.names, self.shapes):
            if name not in expected:
                out.append(f"unknown weight name {name!r}")
            elif shape != expected[name]:
                out.append(f"{name}: shape {list(shape)} does not match the model's {list(expected[name])}")
        return out
