"""When the compiled decoder-layer loop cuts a step's batch into groups of sequences that
run side by side, each group on one thread through every op of every layer
(kernels/csrc/decoder_layers_cpu.cpp), instead of every op on every thread in turn.

Why: with every op on every thread, a step is the GEMMs' compute, then attention's
memory reads, then the next GEMMs, one after the other, with the threads meeting at the
end of each of ~10 ops a layer. Groups on their own threads drift apart, so one thread's
attention reads overlap the other's GEMMs, and the threads never meet inside the step. A
row's bits are the same either way (each op computes a row from that row alone, attention
from its own sequence), so this is a choice of speed only.

The price: every thread reads every weight, once per group instead of a share of it once.
With too few rows a group, a GEMM's weight reads stop hiding behind its FMAs and the split
costs more than it gains, so smaller batches run as one. Measured on an AMD EPYC Zen 4
(2 threads, SmolLM2-135M decoding, both ways alternated step by step in one engine, every
forward compared bitwise; paired median of step times, split / whole): fp32 at 32 rows a
group 0.967, 16 rows 0.993, 12 rows 1.103; bf16 at 32 rows 0.963, 16 rows 0.981, 8 rows
0.945, 6 rows 1.108, 4 rows 1.046. Hence at least 16 FLOPs per weight byte a group: 32
rows in fp32, 16 in bf16.
"""
from __future__ import annotations

# Rows a group needs before the split pays, per byte of a weight (see above).
MIN_ROWS_PER_WEIGHT_BYTE = 8
# A row's GEMMs cost about as much as attention over this many keys (a 64-sequence bf16
# decode profile on an AMD EPYC Zen 4: 47.6 ms of GEMMs for 64 rows, 15.4 ms of attention
# over 64 x ~300 keys), so a sequence's cost is q_len * (KEYS_PER_ROW + seq_len).
KEYS_PER_ROW = 1024
# The most a group may cost over an even share: past it, the thread done first waits.
MAX_IMBALANCE = 1.1


def layer_groups(query_start_loc: list[int], seq_lens: list[int], threads: int, min_rows: int) -> list[int]:
    """Sequence indices [0, ..., S] cutting the batch into `threads` contiguous groups of
    about equal cost, or [0, S] (one group, every op on every thread) where that cannot be
    done within MAX_IMBALANCE with at least min_rows rows a group (the caller's
    MIN_ROWS_PER_WEIGHT_BYTE times its weights' element size)."""
    seqs = len(seq_lens)
    whole = [0, seqs]
    if threads < 2 or seqs < threads or query_start_loc[-1] < threads * min_rows:
        return whole
    costs = [(query_start_loc[s + 1] - query_start_loc[s]) * (KEYS_PER_ROW + seq_lens[s]) for s in range(seqs)]
    total, cuts, spent = sum(costs), [0], 0
    for s, cost in enumerate(costs):
        share = total * len(cuts) / threads
        if len(cuts) < threads and s > cuts[-1] and spent + cost / 2 > share:
            cuts.append(s)  # s starts the next group: nearer the even share than after it
        spent += cost
    cuts.append(seqs)
    if len(cuts) != threads + 1:
        return whole
    for a, b in zip(cuts, cuts[1:]):
        if (query_start_loc[b] - query_start_loc[a] < min_rows
                or sum(costs[a:b]) > MAX_IMBALANCE * total / threads):
            return whole
    return cuts
