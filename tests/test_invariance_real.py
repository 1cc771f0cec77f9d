"""The invariance contract on the default model (SmolLM2-135M-Instruct, fp32).

One run: a greedy and a seeded-sampling needle (a real chat prompt) are each run alone,
then together at random positions among 30 prompts of random lengths under a 64-token
budget (chunked prefill, mixed prefill/decode steps), then again on the warm prefix
cache. One intra-op thread keeps it well under a minute on a loaded 2-core machine.
"""
from __future__ import annotations

import random

import pytest

from tests.invariance_harness import Req, greedy, make_engine, random_prompt, run, sampled

pytestmark = pytest.mark.real_model



def test_needles_alone_vs_batched_chunked_and_cached() -> None:
    engine = make_engine(None, num_threads=1, kv_cache_memory_gb=0.25, enable_prefix_caching=False)
    tok = engine.tokenizer
    text = tok.apply_chat_template(
        [{"role": "user", "content": "Name three prime numbers and explain why they are prime."}],
        tokenize=False, add_generation_prompt=True,
    )
    prompt = tuple(tok.encode(text, add_special_tokens=False))
    needles = [Req("greedy", prompt, greedy(12)), Req("sampled", prompt, sampled(2024, 12))]
    alone = {n.rid: run(engine, [n])[n.rid] for n in needles}
    assert all(len(o.token_ids) == 12 for o in alone.values())

    rng = random.Random(0)
    batch = [Req(f"o{i}", random_prompt(rng, rng.randint(1, 64), 49152), sampled(i, 8)) for i in range(30)]
    for n in needles:
        batch.insert(rng.randrange(len(batch) + 1), n)
    batched = make_engine(None, num_threads=1, kv_cache_memory_gb=0.25, max_num_batched_tokens=64)
    got = run(batched, batch)
    assert {rid: got[rid] for rid in alone} == alone

    hits = batched.stats()["prefix_hit_tokens"]
    warm = {n.rid: run(batched, [Req(n.rid + "-warm", n.prompt, n.params)])[n.rid + "-warm"] for n in needles}
    assert batched.stats()["prefix_hit_tokens"] - hits == 2 * ((len(prompt) - 1) // 16 * 16) > 0
    assert warm == alone
