"""The forward thread of async scheduling: runs a step's forward (and sampling) while the
step thread builds and delivers the previous step's outputs.

The forward's torch and compiled ops release the GIL, so the Python work of the output
side runs while they compute. Only the model runner runs here: it reads the scheduled
requests (token ids, params, seed, grammar) and writes nothing the step thread reads
before the step's commit.
"""
from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor

import torch

from asyncengine.model_runner import ModelRunner
from asyncengine.outputs import ModelRunnerOutput, SchedulerOutput
from asyncengine.reliability.isolation import execute_isolated

ForwardResult = tuple[ModelRunnerOutput, dict[str, str]]


class ForwardThread:
    """One worker thread running execute_isolated(runner, sched), one step at a time."""

    def __init__(self, runner: ModelRunner) -> None:
        self.runner = runner
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="asyncengine-forward")

    def submit(self, sched: SchedulerOutput) -> Future[ForwardResult]:
        # torch's intra-op thread count is per thread once a thread has run an op: pass the
        # step thread's current one along (EngineConfig.num_threads, or what a caller set).
        return self._pool.submit(self._run, sched, torch.get_num_threads())

    def _run(self, sched: SchedulerOutput, num_threads: int) -> ForwardResult:
        if torch.get_num_threads() != num_threads:
            torch.set_num_threads(num_threads)
        return execute_isolated(self.runner, sched)

    def close(self) -> None:
        self._pool.shutdown(wait=True)
