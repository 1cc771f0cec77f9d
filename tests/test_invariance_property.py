"""Property: under any schedule, every request gives the bits of its solo run.

Hypothesis draws the requests (prompt lengths, shared prefixes, greedy or seeded
sampling, output lengths, arrival steps) and the engine (token budget, chunked prefill
on/off, max_num_seqs, prefix caching, a pool from barely-fits to ample). Each request
is compared with == against the same request run alone on a reference engine (one
sequence at a time, no prefix cache, ample pool).
"""
from __future__ import annotations

import random
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from asyncengine.engine_core import EngineCore
from tests.invariance_harness import MODES, Outcome, Req, make_engine, random_prompt, run

VOCAB = 384
BLOCK = 16
# Shared-prefix sources: prompts start with up to 64 tokens of one of these.
PREFIXES = [random_prompt(random.Random(i), 64, VOCAB) for i in range(2)]



@st.composite
def request_lists(draw: st.DrawFn) -> list[Req]:
    reqs = []
    for i in range(draw(st.integers(1, 10))):
        rng = random.Random(draw(st.integers(0, 2**32)))
        shared = draw(st.integers(0, 64))
        prefix = PREFIXES[draw(st.integers(0, len(PREFIXES) - 1))][:shared]
        prompt = prefix + random_prompt(rng, draw(st.integers(1 if not shared else 0, 120)), VOCAB)
        params = MODES[draw(st.sampled_from(list(MODES)))](draw(st.integers(0, 3)), draw(st.integers(1, 10)))
        reqs.append(Req(f"r{i}", prompt, params, arrival_step=draw(st.integers(0, 12))))
    return reqs


@st.composite
def engine_options(draw: st.DrawFn, reqs: list[Req]) -> dict[str, object]:
    longest = max(len(r.prompt) + r.params.max_tokens for r in reqs)
    chunked = draw(st.booleans())
    budget = draw(st.sampled_from([8, 16, 33, 64, 512]))
    if not chunked:  # an unchunked prompt (or a recompute) must fit the budget
        budget = max(budget, longest)
    need = -(-longest // BLOCK)  # blocks of the largest request: the smallest pool that runs it
    return {
        "num_threads": 1,
        "enable_chunked_prefill": chunked,
        "max_num_batched_tokens": budget,
        "max_num_seqs": draw(st.sampled_from([1, 2, 3, 8, 64])),
        "enable_prefix_caching": draw(st.booleans()),
        "num_kv_blocks": max(2, need + draw(st.sampled_from([0, 1, 3, 1024]))),
    }


_solo_engines: dict[str, EngineCore] = {}
_solo_cache: dict[tuple[str, tuple[int, ...], object], Outcome] = {}


def _solo(model_dir: Path, req: Req) -> Outcome:
    key = (str(model_dir), req.prompt, req.params)
    if key not in _solo_cache:
        if str(model_dir) not in _solo_engines:
            _solo_engines[str(model_dir)] = make_engine(
                model_dir, num_threads=1, max_num_seqs=1, enable_prefix_caching=False, num_kv_blocks=1024
            )
        _solo_cache[key] = run(_solo_engines[str(model_dir)], [Req("solo", req.prompt, req.params)])["solo"]
    return _solo_cache[key]


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                                           HealthCheck.function_scoped_fixture])
@given(data=st.data(), arch=st.sampled_from(["qwen2", "qwen3"]))
def test_every_request_matches_its_solo_run(tiny_dirs: dict[str, Path], data: st.DataObject, arch: str) -> None:
    reqs = data.draw(request_lists(), label="requests")
    options = data.draw(engine_options(reqs), label="engine")
    engine = make_engine(tiny_dirs[arch], **options)
    got = run(engine, reqs)
    stats = engine.stats()  # what the example exercised (pytest --hypothesis-show-statistics)
    event(f"preempted: {stats['num_preemptions'] > 0}")
    event(f"prefix hit: {stats['prefix_hit_tokens'] > 0}")
    for r in reqs:
        assert got[r.rid] == _solo(tiny_dirs[arch], r), r.rid
