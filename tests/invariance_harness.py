"""Helpers for the invariance tests: run requests through an EngineCore under a chosen
batching schedule and reduce each request to the exact values the contract covers.

An Outcome holds token ids, logprobs (Python floats, compared with ==, i.e. bitwise for
every finite value and for -inf; a NaN never equals itself, so it fails), top-N
alternatives, the finish reason, and -- for requests that ask for them -- raw logprobs
and log_kept_mass. The modes cover greedy, seeded top-p sampling, and seeded sampling
with repetition/presence/frequency penalties, top-k and min-p.
"""
from __future__ import annotations

import random
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from asyncengine.config import EngineConfig
from asyncengine.engine_core import EngineCore
from asyncengine.sampling_params import SamplingParams

MAX_TOKENS = 8


@dataclass(frozen=True, slots=True)
class Outcome:
    token_ids: tuple[int, ...]
    logprobs: tuple[float, ...]
    top_logprobs: tuple[tuple[tuple[int, float], ...], ...]
    finish_reason: str | None
    # Raw prompt logprobs and their top-N (when the request asked for prompt_logprobs).
    prompt_logprobs: tuple[object, ...] | None = None
    # Per token, when the request asked for them (return_raw_logprob / return_log_kept_mass).
    raw_logprobs: tuple[float, ...] = ()
    log_kept_mass: tuple[float, ...] = ()


@dataclass(frozen=True, slots=True)
class Req:
    """One request of a scenario: a prompt, its params, and the step it arrives at."""

    rid: str
    prompt: tuple[int, ...]
    params: SamplingParams
    arrival_step: int = 0


def greedy(max_tokens: int = MAX_TOKENS) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, logprobs=5, ignore_eos=True)


def sampled(seed: int, max_tokens: int = MAX_TOKENS) -> SamplingParams:
    return SamplingParams(temperature=0.8, top_p=0.9, seed=seed, max_tokens=max_tokens, logprobs=5, ignore_eos=True)


def penalized(seed: int, max_tokens: int = MAX_TOKENS) -> SamplingParams:
    """Every other part of the contract: penalties (their state grows with the output),
    top-k, min-p, and the raw logprob and log_kept_mass fields."""
    return SamplingParams(temperature=1.1, top_k=40, min_p=0.02, repetition_penalty=1.3, presence_penalty=0.4,
                          frequency_penalty=0.2, seed=seed, max_tokens=max_tokens, logprobs=3, ignore_eos=True,
                          return_raw_logprob=True, return_log_kept_mass=True)


MODES = {"greedy": lambda seed, n=MAX_TOKENS: greedy(n), "sampled": sampled, "penalized": penalized}


def make_engine(model_dir: Path | str | None, **options: Any) -> EngineCore:
    return EngineCore(EngineConfig(model=None if model_dir is None else str(model_dir), **options))


def run(engine: EngineCore, reqs: Sequence[Req], max_steps: int = 100_000) -> dict[str, Outcome]:
    """Add each request at its arrival step (counted in engine steps), step to the end."""
    pending = sorted(reqs, key=lambda r: r.arrival_step)
    tokens: dict[str, list[int]] = {r.rid: [] for r in reqs}
    lps: dict[str, list[float]] = {r.rid: [] for r in reqs}
    tops: dict[str, list[tuple[tuple[int, float], ...]]] = {r.rid: [] for r in reqs}
    extra: dict[str, tuple[list[float], list[float]]] = {r.rid: ([], []) for r in reqs}
    reasons: dict[str, str | None] = {}
    prompt_lps: dict[str, tuple[object, ...]] = {}
    step = 0
    while pending or engine.has_unfinished():
        while pending and pending[0].arrival_step <= step:
            r = pending.pop(0)
            engine.add_request(r.rid, list(r.prompt), r.params)
        for out in engine.step():
            tokens[out.request_id].extend(out.token_ids)
            lps[out.request_id].extend(out.logprobs)
            tops[out.request_id].extend(tuple(t) for t in out.top_logprobs or ())
            extra[out.request_id][0].extend(out.raw_logprobs or ())
            extra[out.request_id][1].extend(out.log_kept_mass or ())
            if out.finished:
                reasons[out.request_id] = out.finish_reason
            if out.prompt_logprobs is not None:
                top = tuple(None if t is None else tuple(t) for t in out.prompt_top_logprobs or ())
                prompt_lps[out.request_id] = (tuple(out.prompt_logprobs), top)
        step += 1
        assert step < max_steps, "the engine did not finish"
    return {
        rid: Outcome(tuple(tokens[rid]), tuple(lps[rid]), tuple(tops[rid]), reasons.get(rid), prompt_lps.get(rid),
                     tuple(extra[rid][0]), tuple(extra[rid][1]))
        for rid in tokens
    }


def solo(engine: EngineCore, prompt: Sequence[int], params: SamplingParams, rid: str = "solo") -> Outcome:
    return run(engine, [Req(rid, tuple(prompt), params)])[rid]


def random_prompt(rng: random.Random, length: int, vocab: int) -> tuple[int, ...]:
    return tuple(rng.randrange(vocab) for _ in range(length))


def diff(got: Mapping[str, Outcome], want: Mapping[str, Outcome]) -> list[str]:
    """Names of the requests whose outcome differs (empty when all are bitwise equal)."""
    return sorted(rid for rid in want if got.get(rid) != want[rid])


@contextmanager
def num_threads(n: int) -> Iterator[None]:
    """torch intra-op threads set to n inside the block, restored after."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def rows_invariant(op: Callable[[Any], Any], x: Any) -> bool:
    """op(x[:m]) row by row equals each row computed alone, for several m and threads."""
    import torch

    alone = torch.cat([op(x[i : i + 1]) for i in range(x.shape[0])])
    for threads in (1, 2):
        with num_threads(threads):
            for m in (1, 2, 7, 16, 33, x.shape[0]):
                if not torch.equal(op(x[:m]), alone[:m]):
                    return False
    return True
