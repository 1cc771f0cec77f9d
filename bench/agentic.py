"""Agentic benchmark: multi-turn sessions with tool feedback, prefix caching on vs off.

S sessions of the guessing game (asyncengine/envs/guess.py) play T turns each at once
through the official `openai` package against a real `asyncengine serve` process: a
shared system prompt, then per turn the policy's reply and a `role: "tool"` result. The
same run is made twice, with the prefix cache on and off, each on a fresh server; the
sampled tokens must be identical (the invariance contract), so both runs do the same
work. Printed per run: output tokens/s, TTFT p50/p99 per turn, and the prefix-cache hit
rate of reusable tokens (cached prompt tokens / the session history before each turn,
turns 2..T; the best possible misses the history's last partial block). A one-turn
warm-up game runs first, so the shared opening (system prompt + first question) is
already cached when the sessions start, as in a long RL run.

    python bench/agentic.py                          # default model, 32 sessions x 8 turns
    python bench/agentic.py --sessions 4 --turns 3 --max-tokens 8 --model /path/to/ckpt
"""
from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root before bench/

import server_process  # noqa: E402  (bench/, beside this script)

from asyncengine.envs import EpisodeResult, GuessGame, play  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="checkpoint directory (default: SmolLM2-135M-Instruct)")
    p.add_argument("--sessions", type=int, default=32)
    p.add_argument("--turns", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--feedback-role", default="tool", choices=["tool", "user"],
                   help="role of the tool results between turns")
    p.add_argument("--server-args", default="", help="extra `asyncengine serve` flags, as one string")
    return p.parse_args(argv)


async def run_sessions(url: str, a: argparse.Namespace) -> tuple[float, list[EpisodeResult]]:
    import openai

    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=1800)
    # One short warm-up turn (compiles nothing, but loads every code path once).
    await play(client, "default", GuessGame(secret=1, max_turns=1), "warmup", max_tokens=2)
    games = [GuessGame(secret=1 + (37 * i) % 100, max_turns=a.turns) for i in range(a.sessions)]
    t0 = time.perf_counter()
    results = await asyncio.gather(*(
        play(client, "default", g, f"bench-{i}", a.max_tokens, seed=1000 * i, temperature=a.temperature,
             feedback_role=a.feedback_role)
        for i, g in enumerate(games)))
    wall = time.perf_counter() - t0
    await client.close()
    return wall, list(results)


def summarize(wall: float, results: list[EpisodeResult]) -> dict[str, Any]:
    turns = [t for r in results for t in r.turns]
    later = [t for r in results for t in r.turns[1:]]
    per_turn: dict[int, list[float]] = {}
    for r in results:
        for i, t in enumerate(r.turns):
            per_turn.setdefault(i + 1, []).append(t.ttft_s * 1e3)
    reusable = sum(t.history_tokens for t in later)
    best = sum((t.history_tokens - 1) // 16 * 16 for t in later)  # the server's default block size
    out_tokens = sum(t.completion_tokens for t in turns)
    return {
        "wall_s": wall, "turns": len(turns), "output_tokens": out_tokens, "output_tok_s": out_tokens / wall,
        "prompt_tokens": sum(t.prompt_tokens for t in turns),
        "cached_tokens": sum(t.cached_tokens for t in turns),
        "hit_rate_reusable": sum(t.cached_tokens for t in later) / max(1, reusable),
        "hit_rate_best_possible": best / max(1, reusable),
        "turn1_cached_frac": sum(r.turns[0].cached_tokens for r in results)
        / max(1, sum(r.turns[0].prompt_tokens for r in results)),
        "ttft_ms": {k: (_pct(v, 50), _pct(v, 99)) for k, v in sorted(per_turn.items())},
        "mean_reward": statistics.fmean(r.reward for r in results),
    }


def _pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, round(q / 100 * (len(s) - 1)))]


def run_mode(a: argparse.Namespace, caching: bool, log_dir: Path) -> tuple[dict[str, Any], list[EpisodeResult]]:
    flags = ["--served-model-name", "default", *a.server_args.split()]
    if a.model:
        flags += ["--model", a.model]
    if not caching:
        flags.append("--no-prefix-caching")
    proc, url = server_process.start_server(flags, log_dir / f"server-{'on' if caching else 'off'}.log")
    try:
        wall, results = asyncio.run(run_sessions(url, a))
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    return summarize(wall, results), results


def print_report(on: dict[str, Any], off: dict[str, Any], identical: bool, a: argparse.Namespace) -> None:
    print(f"agentic: {a.sessions} sessions x {a.turns} turns, max_tokens {a.max_tokens}, "
          f"feedback role {a.feedback_role}")
    for name, s in (("prefix caching on", on), ("prefix caching off", off)):
        print(f"  {name:19s}: {s['output_tok_s']:7.1f} output tok/s ({s['output_tokens']} tokens, {s['turns']} turns, "
              f"{s['wall_s']:.1f} s), prompt {s['prompt_tokens']} tokens, cached {s['cached_tokens']}, "
              f"hit rate of reusable tokens {100 * s['hit_rate_reusable']:.1f}% "
              f"(best possible {100 * s['hit_rate_best_possible']:.1f}%), turn-1 cached "
              f"{100 * s['turn1_cached_frac']:.1f}%, mean reward {s['mean_reward']:.3f}")
        print("    TTFT p50/p99 ms per turn: " + "  ".join(
            f"{k}: {p50:.0f}/{p99:.0f}" for k, (p50, p99) in s["ttft_ms"].items()))
    print(f"  on/off: output tok/s x{on['output_tok_s'] / off['output_tok_s']:.2f}, wall x{off['wall_s'] / on['wall_s']:.2f} "
          f"faster; sampled tokens identical in both runs: {identical}")
    print(json.dumps({"on": on, "off": off, "identical": identical}))


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        on, res_on = run_mode(a, True, Path(tmp))
        off, res_off = run_mode(a, False, Path(tmp))
    identical = [r.replies for r in res_on] == [r.replies for r in res_off]
    print_report(on, off, identical, a)
    return 0 if identical else 1


if __name__ == "__main__":
    raise SystemExit(main())
