"""Fault isolation of a step's forward: one failing request must not fail its batch.

When the batched forward raises, each scheduled request is run again alone. The forward
of a request writes only its own KV slots, and in deterministic mode a row's bits do not
depend on its batch, so a retried request gets exactly the KV, logits and sample it
would have got in the batch: its outputs are unchanged. Requests whose solo forward
raises again are the failed ones. Nothing is committed (num_computed_tokens, prefix
cache) until EngineCore._update, so a failed request leaves no state behind.
"""
from __future__ import annotations

import logging

from asyncengine.model_runner import ModelRunner
from asyncengine.outputs import ModelRunnerOutput, SchedulerOutput

log = logging.getLogger(__name__)


def execute_isolated(runner: ModelRunner, sched: SchedulerOutput) -> tuple[ModelRunnerOutput, dict[str, str]]:
    """runner.execute(sched), and request_id -> message for requests whose forward failed."""
    try:
        return runner.execute(sched), {}
    except Exception as exc:  # isolate below; a BaseException (KeyboardInterrupt) is not ours
        log.warning("a step's forward failed (%r); retrying its %d requests one by one", exc, len(sched.scheduled))
    out = ModelRunnerOutput(samples={}, prompt_logprobs={})
    failed: dict[str, str] = {}
    for s in sched.scheduled:
        solo = SchedulerOutput(scheduled=[s], num_batched_tokens=s.num_new_tokens)
        try:
            one = runner.execute(solo)
        except Exception as exc:
            log.exception("the forward of request %s failed", s.request.request_id)
            failed[s.request.request_id] = f"the model forward failed: {exc!r}"
            continue
        out.samples.update(one.samples)
        out.prompt_logprobs.update(one.prompt_logprobs)
        out.failed.update(one.failed)
    return out, failed
