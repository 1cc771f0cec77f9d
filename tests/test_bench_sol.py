"""bench/sol.py's speed-of-light arithmetic, on numbers small enough to count by hand."""
from __future__ import annotations

from bench.sol import Machine, ModelCost, faster, sol_seconds

ONE = Machine(fp32_flops=1.0, bf16_flops=1.0, bf16_unit="none", read_bytes=1.0, wall=(1.0, 1.0, 1.0))


def _cost(weight_bytes: int = 0, kv_token_bytes: int = 0) -> ModelCost:
    return ModelCost(layers=1, attn_dim=1, body_params=1, head_params=1, weight_bytes=weight_bytes,
                     kv_token_bytes=kv_token_bytes, body_bf16=False, head_bf16=False)


def test_flops_are_counted_per_token() -> None:
    # A 3-token prompt, 2 new tokens. Prefill: body 2 x 3, attention 4 x (1 + 2 + 3) keys,
    # the head once (its last token) = 6 + 24 + 2. The decode step: body 2, head 2,
    # attention 4 x 4 keys = 20.
    assert sol_seconds(_cost(), ONE, [3], 2, budget=2048, max_seqs=64) == 32 + 20
    # Chunked into steps of 2 tokens, the same FLOPs (no head on the first chunk).
    assert sol_seconds(_cost(), ONE, [3], 2, budget=2, max_seqs=64) == 32 + 20


def test_each_step_takes_the_larger_of_compute_and_memory() -> None:
    # 100 bytes of weights per step dominate every step: 2 prefill steps + 1 decode step.
    assert sol_seconds(_cost(weight_bytes=100), ONE, [3], 2, budget=2, max_seqs=64) == 300
    # KV traffic: the decode step reads 3 cached tokens and writes 1 (x 10 bytes).
    decode_only = sol_seconds(_cost(kv_token_bytes=10), ONE, [3], 2, budget=2048, max_seqs=64) - 32
    assert decode_only == max(20, 40)


def test_sequences_past_max_seqs_decode_in_another_group() -> None:
    one_group = sol_seconds(_cost(weight_bytes=100), ONE, [1, 1], 3, budget=2048, max_seqs=2)
    two_groups = sol_seconds(_cost(weight_bytes=100), ONE, [1, 1], 3, budget=2048, max_seqs=1)
    assert (one_group, two_groups) == (100 + 2 * 100, 100 + 4 * 100)


def test_a_second_probing_only_raises_each_rate() -> None:
    slow_fma = Machine(fp32_flops=0.5, bf16_flops=2.0, bf16_unit="none", read_bytes=3.0, wall=(0.5, 2.0, 1.0))
    best = faster(ONE, slow_fma)
    assert (best.fp32_flops, best.bf16_flops, best.read_bytes, best.wall) == (1.0, 2.0, 3.0, (1.0, 2.0, 1.0))
    # A slower probing never lowers the speed of light a faster one set (so never raises our share).
    cost = _cost(weight_bytes=100)
    assert sol_seconds(cost, faster(ONE, slow_fma), [3], 2, budget=2, max_seqs=64) <= sol_seconds(
        cost, ONE, [3], 2, budget=2, max_seqs=64)
