"""The task runs of the CPU GEMMs (kernels/csrc/task_runs.h): every task runs exactly once,
and a thread done with its own run takes the other's unstarted tasks. Through a test op that
starts thread 0 late, so thread 1 has to take from thread 0's run."""
from __future__ import annotations

import pytest
import torch

from kernels import attention_cpu
from tests.invariance_harness import num_threads

pytestmark = pytest.mark.skipif(not attention_cpu.available(), reason="the compiled CPU ops cannot be built here")


def _trace(count: int, delay_us: int) -> torch.Tensor:
    return torch.ops.asyncengine_cpu.task_runs_trace(count, delay_us)  # [count, 2]: runs, thread


@pytest.mark.parametrize("count", [1, 2, 3, 64, 1001])
def test_every_task_runs_once(count: int) -> None:
    for threads in (1, 2):
        with num_threads(threads):
            trace = _trace(count, 2000)
        assert trace[:, 0].tolist() == [1] * count, f"{threads} threads"


def test_a_late_thread_finds_its_run_taken() -> None:
    count = 64
    with num_threads(2):
        if torch.get_num_threads() < 2:
            pytest.skip("needs 2 threads")
        trace = _trace(count, 50_000)  # thread 0 starts 50 ms late: thread 1 runs ~everything
    ran_by = trace[:, 1]
    assert trace[:, 0].tolist() == [1] * count
    assert (ran_by[: count // 2] == 1).sum() > 0, "thread 1 took nothing of thread 0's run"
    assert (ran_by[count // 2 :] == 1).all(), "thread 1's own run went elsewhere"
    with num_threads(1):
        assert (_trace(count, 0)[:, 1] == 0).all()
