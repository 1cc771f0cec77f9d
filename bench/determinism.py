"""What bitwise batch invariance costs, and whether it holds at scale.

1. Throughput: the same workload (random token-id prompts, fixed output length,
   seeded sampling) on deterministic=True and deterministic=False engines, alternating
   repeats in one process, which of the two goes first alternating too; prints tokens/s
   of each and the cost ratio (target <= 1.3x). Like for like: the warm-up uses a prompt
   of its own and every timed run starts on an empty prefix cache, so both engines
   compute every prompt token of every repeat; "computed tok/s" counts the prompt tokens
   the engine computed (prefix-cache hits are reported, not counted) plus the outputs.
2. The TML-style count ("Defeating Nondeterminism in LLM Inference"): N completions of
   one chat prompt with one seed at T=0.8 run inside random batches (random companions,
   arrival steps, token budgets, warm or cold prefix cache) -> number of unique outputs
   (target 1), counted on token ids and on token ids + logprobs bits; repeated with
   deterministic=False on the same N completions in the same batches, for contrast.

    python bench/determinism.py --threads 1            # default model (both counts on 200 completions)
    python bench/determinism.py --completions 50 --no-fast-contrast --threads 1
"""
from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

# The repo root first: run as a script, bench/ leads sys.path and bench/kernels.py
# would shadow the `kernels` package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from asyncengine.config import EngineConfig  # noqa: E402
from asyncengine.engine_core import EngineCore  # noqa: E402
from asyncengine.sampling_params import SamplingParams  # noqa: E402

PROMPT = "Tell me about Richard Feynman."
BUDGETS = (64, 256, 2048)


def make_engine(a: argparse.Namespace, deterministic: bool, **options: object) -> EngineCore:
    return EngineCore(EngineConfig(
        model=a.model, dtype=a.dtype, deterministic=deterministic, num_threads=a.threads,
        kv_cache_memory_gb=0.5, **options,  # type: ignore[arg-type]
    ))


def run(engine: EngineCore, reqs: list[tuple[str, list[int], SamplingParams, int]]) -> dict[str, tuple]:
    """reqs: (id, prompt, params, arrival step) -> id: (token ids, logprobs)."""
    pending = sorted(reqs, key=lambda r: r[3])
    outs: dict[str, tuple[list[int], list[float]]] = {r[0]: ([], []) for r in reqs}
    step = 0
    while pending or engine.has_unfinished():
        while pending and pending[0][3] <= step:
            rid, prompt, params, _ = pending.pop(0)
            engine.add_request(rid, prompt, params)
        for out in engine.step():
            outs[out.request_id][0].extend(out.token_ids)
            outs[out.request_id][1].extend(out.logprobs)
        step += 1
    return {rid: (tuple(t), tuple(lp)) for rid, (t, lp) in outs.items()}


# --- 1. throughput ------------------------------------------------------------------
def throughput(a: argparse.Namespace) -> None:
    rng = random.Random(0)
    engines = {True: make_engine(a, True), False: make_engine(a, False)}
    vocab = engines[True].model_info.vocab_size
    prompts = [[rng.randrange(vocab) for _ in range(rng.randint(32, 128))] for _ in range(a.throughput_prompts)]
    params = [SamplingParams(max_tokens=a.output_len, ignore_eos=True, temperature=0.8, top_p=0.9, seed=i)
              for i in range(len(prompts))]
    n_prompt, n_out = sum(map(len, prompts)), a.output_len * len(prompts)
    print(f"throughput: {len(prompts)} prompts ({n_prompt} tokens) x {a.output_len} new tokens, "
          f"dtype {a.dtype}, {torch.get_num_threads()} threads, {a.repeats} alternating repeats")
    # The warm-up's own prompt (no timed prompt shares a block with it).
    warm = [("w", [rng.randrange(vocab) for _ in range(32)], SamplingParams(max_tokens=4), 0)]
    times: dict[bool, list[float]] = {True: [], False: []}
    computed: dict[bool, list[int]] = {True: [], False: []}
    results: dict[bool, dict[str, tuple]] = {}
    for rep in range(a.repeats):
        for det in ((True, False) if rep % 2 == 0 else (False, True)):
            engine = engines[det]
            run(engine, [(f"{w}-{rep}", *rest) for w, *rest in warm])
            engine.reset_prefix_cache()  # cold: no repeat reuses an earlier repeat's prompt KV
            hits = engine.stats()["prefix_hit_tokens"]
            reqs = [(f"t{i}-{rep}", p, sp, 0) for i, (p, sp) in enumerate(zip(prompts, params))]
            start = time.perf_counter()
            res = run(engine, reqs)
            times[det].append(time.perf_counter() - start)
            computed[det].append(n_prompt - int(engine.stats()["prefix_hit_tokens"] - hits))
            results[det] = {k.rsplit("-", 1)[0]: v for k, v in res.items()}
    for det, name in ((True, "deterministic=True "), (False, "deterministic=False")):
        best, med = min(times[det]), statistics.median(times[det])
        k = times[det].index(best)
        print(f"  {name}: best {n_out / best:7.1f} out tok/s ({(computed[det][k] + n_out) / best:7.1f} computed "
              f"tok/s: {computed[det][k]} of {n_prompt} prompt tokens computed), median {n_out / med:7.1f} "
              f"out tok/s  [{best:.2f} s best of {len(times[det])}]")
    ratio_best = min(times[True]) / min(times[False])
    ratio_med = statistics.median(times[True]) / statistics.median(times[False])
    print(f"  cost of invariance: {ratio_best:.3f}x (best), {ratio_med:.3f}x (median); target <= 1.3x")
    same = sum(results[True][k] == results[False][k] for k in results[True])
    same_ids = sum(results[True][k][0] == results[False][k][0] for k in results[True])
    print(f"  deterministic vs fast path: {same_ids}/{len(prompts)} completions with equal token ids, "
          f"{same}/{len(prompts)} also with equal logprob bits")


# --- 2. TML-style unique-output count -----------------------------------------------
def unique_outputs(a: argparse.Namespace, deterministic: bool, completions: int) -> None:
    engines = [make_engine(a, deterministic, max_num_batched_tokens=b) for b in BUDGETS]
    tok = engines[0].tokenizer
    text = tok.apply_chat_template([{"role": "user", "content": PROMPT}], tokenize=False, add_generation_prompt=True)
    prompt = list(tok.encode(text, add_special_tokens=False))
    target = SamplingParams(max_tokens=a.completion_len, temperature=0.8, seed=42)
    vocab = engines[0].model_info.vocab_size
    rng = random.Random(1)
    outputs: list[tuple] = []
    batch_sizes: list[int] = []
    start = time.perf_counter()
    while len(outputs) < completions:
        engine = rng.choice(engines)
        if rng.random() < 0.3:
            engine.reset_prefix_cache()  # a cold cache this round
        copies = min(rng.randint(8, 48), completions - len(outputs))
        reqs = [(f"x{len(outputs)}-{i}", prompt, target, rng.randint(0, 6)) for i in range(copies)]
        for j in range(rng.randint(0, 12)):
            other = [rng.randrange(vocab) for _ in range(rng.randint(1, 128))]
            sp = SamplingParams(max_tokens=rng.randint(1, a.completion_len), temperature=0.8, seed=j)
            reqs.append((f"o{len(outputs)}-{j}", other, sp, rng.randint(0, 6)))
        rng.shuffle(reqs)
        res = run(engine, reqs)
        outputs += [v for k, v in res.items() if k.startswith("x")]
        batch_sizes.append(len(reqs))
    elapsed = time.perf_counter() - start
    tokens = {o[0] for o in outputs}
    print(f"  deterministic={deterministic!s:5}: {len(outputs)} completions in {len(batch_sizes)} random batches "
          f"(sizes {min(batch_sizes)}-{max(batch_sizes)}, budgets {BUDGETS}) -> "
          f"{len(tokens)} unique token sequences, {len(set(outputs))} unique (tokens + logprobs)  [{elapsed:.0f} s]")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None, help="HF checkpoint directory (default: SmolLM2-135M-Instruct)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--threads", type=int, default=None, help="intra-op threads (default: torch's)")
    p.add_argument("--throughput-prompts", type=int, default=32)
    p.add_argument("--output-len", type=int, default=32)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--completions", type=int, default=200, help="0: throughput only")
    p.add_argument("--completion-len", type=int, default=32)
    p.add_argument("--no-fast-contrast", action="store_true",
                   help="skip the same count on deterministic=False")
    a = p.parse_args()
    t0 = time.perf_counter()
    throughput(a)
    if a.completions:
        print(f"unique outputs: {a.completions} completions of one chat prompt, seed 42, T=0.8, "
              f"{a.completion_len} tokens (target: 1 unique)")
        unique_outputs(a, True, a.completions)
    if a.completions and not a.no_fast_contrast:
        unique_outputs(a, False, a.completions)  # the same N, batches and schedule: like for like
    print(f"total {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
