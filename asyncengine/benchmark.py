"""`asyncengine bench`: offline throughput on random token-id prompts.

Modelled on `vllm bench throughput`: N prompts of random token ids (lengths drawn
uniformly around --input-len), each generating exactly --output-len tokens (greedy,
ignore_eos), all submitted to one `LLM.generate` call. Reports requests/s, generated
tokens/s and total (prompt + generated) tokens/s, optionally as JSON.

    asyncengine bench --num-prompts 64 --input-len 128 --output-len 128
    asyncengine bench --dtype bfloat16 --range-ratio 0.5 --output-json bench.json
"""
from __future__ import annotations

import argparse
import json
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from asyncengine.config import EngineConfig

# Random ids stay this far from both ends of the vocabulary, where tokenizers usually
# keep special and added tokens that could change how the model behaves.
_ID_MARGIN = 100
# Warm-up requests only need to touch prefill and a few decode steps.
_WARMUP_TOKENS = 8


def _int_at_least(lo: int) -> Callable[[str], int]:
    """An argparse type: an integer of at least `lo`."""

    def parse(text: str) -> int:
        value = int(text)
        if value < lo:
            raise argparse.ArgumentTypeError(f"must be >= {lo}, got {value}")
        return value

    parse.__name__ = "int"  # argparse names the type in its "invalid int value" message
    return parse


def _ratio(text: str) -> float:
    value = float(text)
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {value}")
    return value


_ratio.__name__ = "float"  # as above: "invalid float value" on non-numbers


def add_bench_args(p: argparse.ArgumentParser) -> None:
    """Workload flags (engine flags come from cli.add_engine_args)."""
    p.add_argument("--num-prompts", type=_int_at_least(1), default=64,
                   help="number of requests (default %(default)s)")
    p.add_argument("--input-len", type=_int_at_least(1), default=128,
                   help="prompt tokens per request (default %(default)s)")
    p.add_argument("--output-len", type=_int_at_least(1), default=128,
                   help="generated tokens per request (default %(default)s)")
    p.add_argument("--range-ratio", type=_ratio, default=0.0,
                   help="draw prompt lengths uniformly in [input_len*(1-r), input_len*(1+r)] (default %(default)s)")
    p.add_argument("--dataset-seed", type=int, default=0, help="seed of the random prompts (default %(default)s)")
    p.add_argument("--output-json", default=None, help="also write the results to this JSON file")
    p.add_argument("--warmup", type=_int_at_least(0), default=2,
                   help="warm-up requests before timing (default %(default)s)")


def length_range(input_len: int, range_ratio: float) -> tuple[int, int]:
    """Inclusive bounds of the prompt lengths (never below one token)."""
    return max(1, int(input_len * (1 - range_ratio))), max(1, int(input_len * (1 + range_ratio)))


def random_prompts(n: int, lengths: tuple[int, int], vocab_size: int, rng: random.Random) -> list[list[int]]:
    """n prompts of random token ids with lengths drawn uniformly from `lengths`."""
    lo, hi = (_ID_MARGIN, vocab_size - _ID_MARGIN) if vocab_size > 2 * _ID_MARGIN else (0, vocab_size)
    return [[rng.randrange(lo, hi) for _ in range(rng.randint(*lengths))] for _ in range(n)]


def _check_fits(a: argparse.Namespace, max_input: int, max_model_len: int) -> None:
    if max_input + a.output_len > max_model_len:
        raise SystemExit(
            f"asyncengine bench: error: the longest prompt ({max_input} tokens, from --input-len "
            f"{a.input_len} and --range-ratio {a.range_ratio}) plus --output-len {a.output_len} exceeds "
            f"the model's max length of {max_model_len} tokens"
        )


def _report(a: argparse.Namespace, config: EngineConfig, model: str, prompt_tokens: int, generated: int,
            elapsed: float) -> dict[str, Any]:
    elapsed = max(elapsed, 1e-9)  # a zero-length clock reading must not divide by zero
    return {
        "model": model,
        "dtype": config.dtype,
        "lm_head_dtype": config.head_dtype,
        "deterministic": config.deterministic,
        "num_requests": a.num_prompts,
        "input_len": a.input_len,
        "output_len": a.output_len,
        "range_ratio": a.range_ratio,
        "prompt_tokens": prompt_tokens,
        "generated_tokens": generated,
        "total_tokens": prompt_tokens + generated,
        "elapsed_s": elapsed,
        "requests_per_s": a.num_prompts / elapsed,
        "generated_tokens_per_s": generated / elapsed,
        "total_tokens_per_s": (prompt_tokens + generated) / elapsed,
    }


def _print_report(r: dict[str, Any]) -> None:
    print(f"Throughput: {r['requests_per_s']:.2f} requests/s, {r['generated_tokens_per_s']:.1f} generated "
          f"tokens/s, {r['total_tokens_per_s']:.1f} total tokens/s")
    print(f"Requests: {r['num_requests']} ({r['prompt_tokens']} prompt + {r['generated_tokens']} generated "
          f"tokens) in {r['elapsed_s']:.3f} s")
    print(f"Config: dtype={r['dtype']}, lm_head_dtype={r['lm_head_dtype']}, deterministic={r['deterministic']}")


def run(a: argparse.Namespace, config: EngineConfig) -> int:
    """Build the engine, time one generate call over the random workload, report."""
    from asyncengine.llm import LLM
    from asyncengine.sampling_params import SamplingParams

    llm = LLM(config=config)
    info = llm.engine.model_info
    lengths = length_range(a.input_len, a.range_ratio)
    # Checked on the range's upper bound, so whether a run fits does not depend on the seed.
    _check_fits(a, lengths[1], info.max_model_len)
    rng = random.Random(a.dataset_seed)
    prompts = random_prompts(a.num_prompts, lengths, info.vocab_size, rng)
    # Warm-up prompts are drawn after the timed ones: distinct ids, so the timed run gets
    # no prefix-cache hits from them, and the timed prompts do not depend on --warmup.
    warmup = random_prompts(a.warmup, lengths, info.vocab_size, rng)
    sp = SamplingParams(max_tokens=a.output_len, temperature=0.0, ignore_eos=True)
    if warmup:
        llm.generate(warmup, sp.with_options(max_tokens=min(a.output_len, _WARMUP_TOKENS)), use_tqdm=False)

    print(f"Benchmarking {a.num_prompts} requests ({lengths[0]}-{lengths[1]} prompt tokens, "
          f"{a.output_len} generated each)...", flush=True)
    t0 = time.perf_counter()
    results = llm.generate(prompts, sp, use_tqdm=False)
    elapsed = time.perf_counter() - t0

    short = [len(r.token_ids) for r in results if len(r.token_ids) != a.output_len]
    if short:
        raise RuntimeError(f"{len(short)} requests did not generate exactly {a.output_len} tokens "
                           f"(got e.g. {short[0]}); the throughput numbers would be wrong")
    generated = sum(len(r.token_ids) for r in results)
    report = _report(a, config, str(llm.engine.model_dir), sum(map(len, prompts)), generated, elapsed)
    _print_report(report)
    if a.output_json:
        path = Path(a.output_json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=2) + "\n")
    return 0
