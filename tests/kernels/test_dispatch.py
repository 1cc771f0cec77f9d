"""Backend choice: the compiled CPU attention for "auto" on CPU, torch when asked (or when
that op cannot be built), Triton launchers when forced."""
from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

import dataclasses

import pytest
import torch

from kernels import activation, attention_cpu, matmul
from kernels.dispatch import CPU_OPS, OPTIONAL_FUSED, TORCH_OPS, KernelOps, get_ops


def test_torch_on_cpu_picks_torch_and_auto_the_cpu_op() -> None:
    assert get_ops("torch", "cpu") is TORCH_OPS
    assert get_ops("torch", torch.device("cpu")) is TORCH_OPS
    # The test machines have a C++ compiler: the op must build, not silently fall back.
    assert get_ops("auto", "cpu") is CPU_OPS
    assert get_ops("cpu", "cpu") is CPU_OPS
    assert CPU_OPS.paged_attention is attention_cpu.paged_attention_cpu


def test_auto_falls_back_to_torch_when_the_cpu_op_cannot_build(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(attention_cpu, "_state", {"error": "no compiler"})
    assert get_ops("auto", "cpu") is TORCH_OPS
    with pytest.raises(RuntimeError, match="no compiler"):
        get_ops("cpu", "cpu")


def test_unknown_backend_is_rejected() -> None:
    with pytest.raises(ValueError, match="unknown kernel backend"):
        get_ops("cuda-graphs", "cpu")


def test_every_op_is_filled_for_torch_and_cpu() -> None:
    """torch fills every op but the optional fused ones; the compiled CPU backend, all."""
    for field in dataclasses.fields(KernelOps):
        assert getattr(CPU_OPS, field.name) is not None, field.name
        if field.name not in OPTIONAL_FUSED:
            assert getattr(TORCH_OPS, field.name) is not None, field.name


@pytest.mark.usefixtures("need_triton")
def test_forced_triton_on_cpu_uses_the_interpreted_kernels() -> None:
    ops = get_ops("triton", "cpu")
    assert ops.name == "triton"
    for field in dataclasses.fields(KernelOps):
        if field.name not in ("name", "new_kv_cache", *OPTIONAL_FUSED):  # the cache allocator is no kernel
            assert getattr(ops, field.name).__name__.endswith("_triton"), field.name
    # The Triton backend fills the fused ops too: its linear layers and SiLU * up are kernels.
    assert ops.packed_linear is matmul.packed_linear_triton and ops.pack_linear is matmul.pack_linear_triton
    assert ops.silu_mul is activation.silu_mul_triton and ops.rope_store_kv is None
    x, w = torch.randn(3, 64), torch.randn(64)
    torch.testing.assert_close(ops.rms_norm(x, w, 1e-6)[0], TORCH_OPS.rms_norm(x, w, 1e-6)[0])
