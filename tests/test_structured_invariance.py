"""Bitwise invariance with grammar masks: a structured request's tokens, logprobs, top-N and
finish reason do not depend on batch, chunked-prefill budget, preemption or threads."""
from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from asyncengine.sampling_params import SamplingParams
from asyncengine.structured import StructuredSpec
from tests.invariance_harness import Req, diff, make_engine, random_prompt, run
from tests.test_structured import ARITH, CHOICES, EMAIL, SCHEMA

VOCAB = 384
BASE = {"num_threads": 1, "num_kv_blocks": 1024}
SPECS = [
    StructuredSpec.json_schema(SCHEMA, any_whitespace=False),
    StructuredSpec.json_schema(SCHEMA),
    StructuredSpec.regex(EMAIL),
    StructuredSpec.choice(CHOICES),
    StructuredSpec.grammar(ARITH),
    None,
]
SAMPLING = [dict(temperature=0.9, top_p=0.9), dict(temperature=0.0), dict(temperature=1.1, top_k=5)]


@pytest.fixture(autouse=True)
def _restore_threads() -> Iterator[None]:
    old = torch.get_num_threads()
    yield
    torch.set_num_threads(old)


def _reqs(seed: str, n: int, lo: int, hi: int, max_tokens: int = 40) -> list[Req]:
    rng = random.Random(seed)
    return [
        Req(f"r{i}", random_prompt(rng, rng.randint(lo, hi), VOCAB),
            SamplingParams(seed=i, max_tokens=max_tokens, logprobs=3, structured=SPECS[i % len(SPECS)],
                           **SAMPLING[i % len(SAMPLING)]))  # type: ignore[arg-type]
        for i in range(n)
    ]


def test_alone_vs_batched(tiny_dirs: dict[str, Path]) -> None:
    reqs = _reqs("batch", 24, 1, 120)
    one = run(make_engine(tiny_dirs["llama"], max_num_seqs=1, **BASE), reqs)
    many = run(make_engine(tiny_dirs["llama"], max_num_seqs=24, **BASE), reqs)
    assert diff(many, one) == []
    assert {o.finish_reason for o in one.values()} == {"stop", "length"}


def test_chunked_prefill_budgets(tiny_dirs: dict[str, Path]) -> None:
    reqs = _reqs("chunk", 10, 1, 250)
    want = run(make_engine(tiny_dirs["qwen2"], enable_chunked_prefill=False, **BASE), reqs)
    for budget in (16, 64):
        got = run(make_engine(tiny_dirs["qwen2"], max_num_batched_tokens=budget, **BASE), reqs)
        assert diff(got, want) == [], f"budget {budget}"


def test_preemption_and_recompute(tiny_dirs: dict[str, Path]) -> None:
    """A pool of 8 blocks preempts requests mid-output; their grammar states must survive
    the recompute (the sampled tokens are kept, the mask picks up where it was)."""
    reqs = _reqs("preempt", 8, 20, 60, max_tokens=48)
    want = run(make_engine(tiny_dirs["qwen2"], **BASE), reqs)
    tiny = make_engine(tiny_dirs["qwen2"], **{**BASE, "num_kv_blocks": 8})
    got = run(tiny, reqs)
    assert tiny.stats()["num_preemptions"] > 0
    assert diff(got, want) == []


def test_weight_update_recompute_keeps_grammar_in_step(tiny_dirs: dict[str, Path]) -> None:
    """recompute with the same weights: every request's KV is redone mid-output, and
    its outputs are unchanged bit for bit."""
    reqs = _reqs("update", 6, 5, 40)
    want = run(make_engine(tiny_dirs["llama"], **BASE), reqs)
    engine = make_engine(tiny_dirs["llama"], **BASE)
    state = {k: v.clone() for k, v in _hf_state(tiny_dirs["llama"]).items()}
    for r in reqs:
        engine.add_request(r.rid, list(r.prompt), r.params)
    tokens: dict[str, list[int]] = {r.rid: [] for r in reqs}
    for step in range(400):
        if step == 5:
            engine.update_weights(state, "recompute")
        for o in engine.step():
            tokens[o.request_id] += o.token_ids
        if not engine.has_unfinished():
            break
    assert {rid: tuple(t) for rid, t in tokens.items()} == {rid: o.token_ids for rid, o in want.items()}


def test_two_threads(tiny_dirs: dict[str, Path]) -> None:
    reqs = _reqs("threads", 6, 1, 60, max_tokens=24)
    want = run(make_engine(tiny_dirs["qwen3"], **BASE), reqs)
    got = run(make_engine(tiny_dirs["qwen3"], **{**BASE, "num_threads": 2, "max_num_batched_tokens": 64}), reqs)
    assert diff(got, want) == []


def _hf_state(model_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(next(model_dir.glob("*.safetensors"))))
