"""Async scheduling vs sync scheduling on the default model, in the same run.

The workloads of bench/throughput.py (greedy, ignore_eos): prefill-heavy and decode-heavy
(64 sequences decoding together at --scale 1). For each workload and dtype, one engine
per mode is loaded once; rounds alternate which mode runs first, and the report gives
each round's tokens/s of both, the async / sync ratio, and the medians over rounds.
Both modes must give the same tokens (checked each round: same bits, the contract).

    python bench/async_scheduling.py --scale 0.0625              # a quick check
    python bench/async_scheduling.py --workloads decode --dtypes float32 --rounds 5

This machine's speed drifts within minutes (and with other users' load): read the ratio
of each round, where both modes ran back to back, more than any absolute figure.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

# Run as a script, bench/ leads sys.path and bench/kernels.py would shadow `kernels`.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from asyncengine.llm import LLM  # noqa: E402
from asyncengine.model_files import resolve_model  # noqa: E402
from asyncengine.sampling_params import SamplingParams  # noqa: E402
from bench.throughput import add_workload_args, workloads  # noqa: E402


def timed_run(llm: LLM, prompts: list[list[int]], new_tokens: int) -> tuple[float, list[list[int]]]:
    """(generated tokens/s, token ids per prompt) of one generate call, warmed up first."""
    sp = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    # Warm-up on every prompt (one token): the first touch of the KV pages a run needs is
    # not the mode's cost (the first round would otherwise pay it).
    llm.generate(prompts, sp.with_options(max_tokens=1), use_tqdm=False)
    llm.engine.reset_prefix_cache()  # every measured prompt is computed
    t0 = time.perf_counter()
    results = llm.generate(prompts, sp, use_tqdm=False)
    wall = time.perf_counter() - t0
    tokens = [r.token_ids for r in results]
    return sum(len(t) for t in tokens) / wall, tokens


def bench_one(a: argparse.Namespace, dtype: str, name: str, prompts: list[list[int]], new: int) -> None:
    engines = {mode: LLM(a.model, dtype=dtype, num_threads=a.threads, async_scheduling=mode) for mode in (False, True)}
    ratios, speeds = [], {False: [], True: []}
    for r in range(a.rounds):
        order = (False, True) if r % 2 == 0 else (True, False)
        got = {mode: timed_run(engines[mode], prompts, new) for mode in order}
        if got[False][1] != got[True][1]:
            raise SystemExit(f"{name} {dtype}: async scheduling changed the tokens (a contract bug)")
        for mode in order:
            speeds[mode].append(got[mode][0])
        ratios.append(got[True][0] / got[False][0])
        print(f"  {name:8s} {dtype:9s} round {r + 1}: sync {got[False][0]:8.1f} tok/s  "
              f"async {got[True][0]:8.1f} tok/s  async/sync {ratios[-1]:.3f}", flush=True)
    print(f"  {name:8s} {dtype:9s} median : sync {statistics.median(speeds[False]):8.1f} tok/s  "
          f"async {statistics.median(speeds[True]):8.1f} tok/s  async/sync {statistics.median(ratios):.3f}")
    for llm in engines.values():
        llm.engine.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_workload_args(ap)
    ap.add_argument("--rounds", type=int, default=3, help="alternate the two modes this many times")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    a = ap.parse_args()
    from transformers import AutoConfig

    loads = workloads(a.scale, AutoConfig.from_pretrained(str(resolve_model(a.model))).vocab_size)
    print(f"async scheduling vs sync, scale {a.scale}, {a.rounds} rounds (generated tokens/s)")
    for dtype in a.dtypes.split(","):
        for name in a.workloads.split(","):
            prompts, new = loads[name]
            bench_one(a, dtype, name, prompts, new)


if __name__ == "__main__":
    main()
