"""Where a step's time goes on the default model: the forward, the logits, the sampler
and the Python work around them (scheduling, input lists, commit, detokenizing, outputs),
i.e. the ceiling of what async scheduling can overlap.

    python bench/step_phases.py --dtype float32 --workload decode    # 64 sequences decoding
    python bench/step_phases.py --workload decode --seqs 16          # 16 of them
    python bench/step_phases.py --dtype bfloat16 --workload prefill  # 64 prompts of 32-512 tokens
    python bench/step_phases.py --workload prefill --default-heap    # glibc's own heap policy

Each phase is timed with perf_counter around the method that runs it (wrapped here, in
this process only); shares are of the whole step loop's wall time.
"""
from __future__ import annotations

import argparse
import random
import resource
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from asyncengine import detokenizer, model_runner  # noqa: E402
from asyncengine.config import EngineConfig  # noqa: E402
from asyncengine.engine_core import EngineCore  # noqa: E402
from asyncengine.sampling_params import SamplingParams  # noqa: E402

PHASES: dict[str, float] = defaultdict(float)


def timed(obj: Any, name: str, phase: str) -> None:
    """Replace obj.name by a wrapper adding its wall time to PHASES[phase]."""
    fn: Callable[..., Any] = getattr(obj, name)

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            PHASES[phase] += time.perf_counter() - t0

    setattr(obj, name, wrapper)


def instrument(core: EngineCore) -> None:
    timed(core.scheduler, "schedule", "schedule (Python)")
    timed(core.runner, "_prepare", "input lists (Python)")
    timed(core.runner.model, "forward", "forward")
    timed(core.runner.model, "compute_logits", "logits (lm_head)")
    timed(core.runner, "_check_rows", "finite check + row stats")
    timed(model_runner.sampler, "sample", "sampler (torch + Python)")
    timed(core, "_commit", "commit (Python)")
    timed(detokenizer.IncrementalDetokenizer, "add", "detokenize (Python)")
    timed(core, "_make_output", "outputs (Python)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--workload", choices=["decode", "prefill"], default="decode")
    ap.add_argument("--steps", type=int, default=40, help="decode steps timed")
    ap.add_argument("--seqs", type=int, default=64, help="sequences decoding (decode workload)")
    ap.add_argument("--default-heap", action="store_true",
                    help="leave glibc's malloc thresholds as they are (EngineConfig.retain_host_heap=False)")
    a = ap.parse_args()
    core = EngineCore(EngineConfig(dtype=a.dtype, num_kv_blocks=4096, retain_host_heap=not a.default_heap))
    rng = random.Random(0)
    vocab = core.model_info.vocab_size

    def prompt(n: int) -> list[int]:
        return [rng.randrange(100, vocab - 100) for _ in range(n)]

    greedy = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
    if a.workload == "decode":
        for i in range(a.seqs):
            core.add_request(f"d{i}", prompt(16), greedy.with_options(max_tokens=a.steps + 20))
        for _ in range(8):  # the prefill and a few warm decode steps, untimed
            core.step()
    else:
        for i in range(8):  # warm-up
            core.add_request(f"w{i}", prompt(rng.randint(32, 512)), greedy)
        while core.has_unfinished():
            core.step()
        core.reset_prefix_cache()
        for i in range(64):
            core.add_request(f"p{i}", prompt(rng.randint(32, 512)), greedy)
    instrument(core)
    steps, t0, faults0 = 0, time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    while core.has_unfinished() and (a.workload == "prefill" or steps < a.steps):
        core.step()
        steps += 1
    wall = time.perf_counter() - t0
    what = f"{a.seqs} sequences" if a.workload == "decode" else "64 prompts"
    print(f"{a.dtype} {a.workload}, {what}: {steps} steps, {wall / steps * 1e3:.1f} ms/step")
    for phase, sec in PHASES.items():
        print(f"  {phase:26s} {sec / steps * 1e3:9.2f} ms  {100 * sec / wall:5.1f}%")
    python = sum(v for k, v in PHASES.items() if "(Python)" in k)  # none nested here (no stop strings)
    print(f"  Python outside forward, logits and sampler: {100 * python / wall:.1f}% of the step")
    # Pages the kernel zero-filled for this process (kernels/host_heap.py: ~0 once retained).
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults0
    print(f"  minor page faults: {faults / steps:.0f} a step")


if __name__ == "__main__":
    main()
