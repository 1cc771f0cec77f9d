"""Structured outputs: constrained vs unconstrained tokens/s at batch 64 on the default model,
and the per-step mask cost of the grammar libraries (the backend choice).

    python bench/structured.py                 # engine: free vs regex vs JSON, 3 alternating rounds
    python bench/structured.py --masks         # xgrammar vs llguidance mask fill, batch 64, 49k vocab

Engine workloads: 64 prompts of ~16 tokens, 64 new tokens each, T = 1 with seeds. Each
grammar cannot end before 64 tokens (a 1000-character regex; a JSON array of at least 100
objects), so every request makes all its tokens and the batch stays 64 wide: the
difference is the masks (fill, unpack, S ∩ G) and nothing else. The time the sampler spends
building masks, and in the sampler as a whole, is also summed, as a share of the run. The machine drifts within minutes:
the workloads alternate and the median ratio of the rounds is printed.
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/kernels.py must not shadow `kernels`

import torch  # noqa: E402

import asyncengine.sampler as sampler_module  # noqa: E402
from asyncengine.llm import LLM  # noqa: E402
from asyncengine.sampling_params import SamplingParams  # noqa: E402
from asyncengine.structured import StructuredSpec  # noqa: E402

PEOPLE = {"type": "array", "minItems": 100, "items": {"type": "object", "required": ["name", "age"], "properties": {
    "name": {"type": "string"}, "age": {"type": "integer"}}}}
WORKLOADS: dict[str, StructuredSpec | None] = {
    "free": None,
    "regex": StructuredSpec.regex(r"[a-zA-Z0-9 ,.]{1000}"),
    "json": StructuredSpec.json_schema(PEOPLE, any_whitespace=False),
}


class Timer:
    """Wraps a module function to sum the time spent in it."""

    def __init__(self, module: Any, name: str) -> None:
        self.seconds = 0.0
        self._real = getattr(module, name)
        setattr(module, name, self._timed)

    def _timed(self, *args: Any) -> Any:
        t = time.perf_counter()
        try:
            return self._real(*args)
        finally:
            self.seconds += time.perf_counter() - t


def run_engine(llm: LLM, prompts: list[list[int]], new: int, spec: StructuredSpec | None,
               timers: list[Timer]) -> tuple[float, list[float]]:
    """(generated tokens/s, share of the run spent in each timer's function)."""
    params = [SamplingParams(max_tokens=new, seed=i, ignore_eos=True, structured=spec) for i in range(len(prompts))]
    llm.generate(prompts[:2], params[:2], use_tqdm=False)  # warm-up, and the grammar compiled (cached)
    llm.engine.reset_prefix_cache()
    for timer in timers:
        timer.seconds = 0.0
    t = time.perf_counter()
    results = llm.generate(prompts, params, use_tqdm=False)
    dt = time.perf_counter() - t
    assert all(len(r.token_ids) == new for r in results), "a request ended early: the batch would shrink"
    return len(prompts) * new / dt, [timer.seconds / dt for timer in timers]


def engine_main(a: argparse.Namespace) -> None:
    if a.threads:
        torch.set_num_threads(a.threads)
    llm = LLM(model=a.model, dtype=a.dtype)
    rng = random.Random(0)
    vocab = llm.engine.model_info.vocab_size
    prompts = [[rng.randrange(100, vocab - 100) for _ in range(rng.randint(14, 18))] for _ in range(a.batch)]
    # The sampler as a whole (model_runner calls sampler.sample), and its mask building.
    timers = [Timer(sampler_module, "sample"), Timer(sampler_module, "allowed_tokens")]
    print(f"{a.batch} prompts x {a.new} new, dtype {a.dtype}, threads {torch.get_num_threads()}, vocab {vocab}")
    ratios: dict[str, list[float]] = {k: [] for k in WORKLOADS if k != "free"}
    for r in range(a.rounds):
        speeds = {}
        for name, spec in WORKLOADS.items():
            speeds[name], (sampling, masks) = run_engine(llm, prompts, a.new, spec, timers)
            print(f"  round {r + 1} {name:5s} {speeds[name]:7.1f} tok/s  sampler {100 * sampling:4.1f}% of the run, "
                  f"of which masks {100 * masks:4.1f}%", flush=True)
        for name in ratios:
            ratios[name].append(speeds[name] / speeds["free"])
    for name, rs in ratios.items():
        print(f"{name} / free: median {statistics.median(rs):.3f} (rounds: {', '.join(f'{x:.3f}' for x in rs)})")


def masks_main(a: argparse.Namespace) -> None:
    from bench.structured_masks import compare

    compare(a.model, a.batch)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--masks", action="store_true", help="compare the grammar libraries' mask cost instead")
    a = ap.parse_args()
    masks_main(a) if a.masks else engine_main(a)


if __name__ == "__main__":
    main()
