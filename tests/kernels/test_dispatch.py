"""Backend choice: torch on CPU for "auto", Triton launchers when forced."""
from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

import dataclasses

import pytest
import torch

from kernels.dispatch import TORCH_OPS, KernelOps, get_ops


def test_torch_and_auto_on_cpu_pick_torch() -> None:
    assert get_ops("torch", "cpu") is TORCH_OPS
    assert get_ops("auto", "cpu") is TORCH_OPS
    assert get_ops("torch", torch.device("cpu")) is TORCH_OPS


def test_unknown_backend_is_rejected() -> None:
    with pytest.raises(ValueError, match="unknown kernel backend"):
        get_ops("cuda-graphs", "cpu")


def test_every_op_is_filled_for_torch() -> None:
    for field in dataclasses.fields(KernelOps):
        assert getattr(TORCH_OPS, field.name) is not None


@pytest.mark.usefixtures("need_triton")
def test_forced_triton_on_cpu_uses_the_interpreted_kernels() -> None:
    ops = get_ops("triton", "cpu")
    assert ops.name == "triton"
    for field in dataclasses.fields(KernelOps):
        if field.name != "name":
            assert getattr(ops, field.name).__name__.endswith("_triton"), field.name
    x, w = torch.randn(3, 64), torch.randn(64)
    torch.testing.assert_close(ops.rms_norm(x, w, 1e-6)[0], TORCH_OPS.rms_norm(x, w, 1e-6)[0])
