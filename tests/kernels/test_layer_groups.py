"""kernels/layer_groups.py: which cuts of a step's batch run a group a thread."""
from __future__ import annotations

import random

from kernels.layer_groups import KEYS_PER_ROW, MAX_IMBALANCE, layer_groups


def _decode(seq_lens: list[int]) -> list[int]:
    return list(range(len(seq_lens) + 1))  # one query row a sequence


def _cost(query_start_loc: list[int], seq_lens: list[int], a: int, b: int) -> int:
    return sum((query_start_loc[s + 1] - query_start_loc[s]) * (KEYS_PER_ROW + seq_lens[s]) for s in range(a, b))


def test_an_even_decode_batch_splits_in_halves() -> None:
    assert layer_groups(_decode([300] * 64), [300] * 64, 2, 32) == [0, 32, 64]
    assert layer_groups(_decode([300] * 96), [300] * 96, 3, 32) == [0, 32, 64, 96]


def test_cuts_balance_the_cost_of_uneven_contexts() -> None:
    rng = random.Random(0)
    for _ in range(50):
        seqs, threads = rng.randint(64, 200), rng.choice([2, 3, 4])
        lens = [rng.randint(10, 2000) for _ in range(seqs)]
        qsl = _decode(lens)
        cuts = layer_groups(qsl, lens, threads, 16)
        total = _cost(qsl, lens, 0, seqs)
        if cuts == [0, seqs]:  # refused: then no cut with these groups' sizes is within the bound
            continue
        assert len(cuts) == threads + 1 and cuts[0] == 0 and cuts[-1] == seqs
        assert all(a < b for a, b in zip(cuts, cuts[1:]))
        for a, b in zip(cuts, cuts[1:]):
            assert b - a >= 16 and _cost(qsl, lens, a, b) <= MAX_IMBALANCE * total / threads


def test_one_thread_few_rows_or_few_sequences_run_as_one() -> None:
    assert layer_groups(_decode([300] * 64), [300] * 64, 1, 32) == [0, 64]
    assert layer_groups(_decode([300] * 63), [300] * 63, 2, 32) == [0, 63]  # 31 + 32 rows
    assert layer_groups([0, 2048], [2048], 2, 32) == [0, 1]  # one prefill chunk
    assert layer_groups(_decode([300] * 3), [300] * 3, 4, 0) == [0, 3]  # fewer sequences than threads


def test_a_prefill_chunk_beside_decodes_is_not_cut_unevenly() -> None:
    # 512 prompt rows and 63 decoding rows: no cut at a sequence boundary is near even
    qsl = [0, 512] + list(range(513, 576))
    lens = [512] + [300] * 63
    assert layer_groups(qsl, lens, 2, 32) == [0, 64]
    # two equal prompts: one a thread
    assert layer_groups([0, 400, 800], [400, 400], 2, 32) == [0, 1, 2]
