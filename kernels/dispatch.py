"""Choose the implementation of the hot ops: Triton on CUDA, torch otherwise.

`get_ops(backend, device)` returns one KernelOps; the model holds it and calls through it,
so the choice is made once, from the engine config, never from the environment.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from kernels.attention import paged_attention_torch
from kernels.kv_store import store_kv_torch
from kernels.rmsnorm import rms_norm_torch
from kernels.rope import apply_rope_torch


@dataclass(frozen=True, slots=True)
class KernelOps:
    name: str
    rms_norm: Callable[..., tuple[torch.Tensor, torch.Tensor | None]]
    apply_rope: Callable[..., tuple[torch.Tensor, torch.Tensor]]
    store_kv: Callable[..., None]
    paged_attention: Callable[..., torch.Tensor]


TORCH_OPS = KernelOps(
    name="torch",
    rms_norm=rms_norm_torch,
    apply_rope=apply_rope_torch,
    store_kv=store_kv_torch,
    paged_attention=paged_attention_torch,
)


def get_ops(backend: str, device: str | torch.device) -> KernelOps:
    """backend: "auto" (Triton on CUDA when Triton imports, else torch), "torch" or "triton"."""
    if backend not in ("auto", "torch", "triton"):
        raise ValueError(f"unknown kernel backend {backend!r}")
    if backend == "torch":
        return TORCH_OPS
    if backend == "auto" and torch.device(device).type != "cuda":
        return TORCH_OPS
    raise NotImplementedError("the Triton backend is not built yet")
