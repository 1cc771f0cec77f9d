"""Command line: asyncengine {serve, generate, bench, parity, rl-check}."""
from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence

from asyncengine.config import EngineConfig


def add_engine_args(p: argparse.ArgumentParser) -> None:
    """Options shared by every command that builds an engine (EngineConfig fields)."""
    d = EngineConfig()
    p.add_argument("--model", default=None, help="HF checkpoint directory (default: SmolLM2-135M-Instruct)")
    p.add_argument("--dtype", default=d.dtype, choices=["float32", "bfloat16"])
    p.add_argument("--lm-head-dtype", default=d.lm_head_dtype, choices=["float32", "bfloat16"])
    p.add_argument("--block-size", type=int, default=d.block_size)
    p.add_argument("--num-kv-blocks", type=int, default=None)
    p.add_argument("--kv-cache-memory-gb", type=float, default=d.kv_cache_memory_gb,
                   help="KV pool budget (default: sized from the memory available at start-up)")
    p.add_argument("--max-num-seqs", type=int, default=d.max_num_seqs)
    p.add_argument("--max-num-batched-tokens", type=int, default=d.max_num_batched_tokens)
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--no-chunked-prefill", action="store_true")
    p.add_argument("--no-prefix-caching", action="store_true")
    p.add_argument("--non-deterministic", action="store_true", help="allow faster batch-dependent paths")
    p.add_argument("--async-scheduling", action="store_true",
                   help="build and deliver a step's outputs while the next forward runs (same outputs)")
    p.add_argument("--gemm-tile-rows", type=int, default=d.gemm_tile_rows,
                   help="rows per BLAS GEMM call in deterministic mode: bf16, torch backend (default %(default)s)")
    p.add_argument("--kernel-backend", default=d.kernel_backend, choices=["auto", "cpu", "torch", "triton"])
    p.add_argument("--device", default=d.device, help='"cpu", "cuda" or "cuda:N" (CUDA runs the Triton kernels)')
    p.add_argument("--num-threads", type=int, default=None)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--session-ttl", type=float, default=d.session_ttl_s, help="seconds an idle session lives")
    p.add_argument("--session-kv-fraction", type=float, default=d.session_kv_fraction,
                   help="share of the KV pool whose live-session blocks are evicted last")
    p.add_argument("--unsafe-keep-prefix-cache-across-updates", action="store_true",
                   help="UNSAFE demonstration of an RL bug (rl-check): new requests reuse KV of older weights")


def config_from_args(a: argparse.Namespace) -> EngineConfig:
    return EngineConfig(
        model=a.model,
        dtype=a.dtype,
        lm_head_dtype=a.lm_head_dtype,
        block_size=a.block_size,
        num_kv_blocks=a.num_kv_blocks,
        kv_cache_memory_gb=a.kv_cache_memory_gb,
        max_num_seqs=a.max_num_seqs,
        max_num_batched_tokens=a.max_num_batched_tokens,
        max_model_len=a.max_model_len,
        enable_chunked_prefill=not a.no_chunked_prefill,
        enable_prefix_caching=not a.no_prefix_caching,
        deterministic=not a.non_deterministic,
        async_scheduling=a.async_scheduling,
        gemm_tile_rows=a.gemm_tile_rows,
        kernel_backend=a.kernel_backend,
        num_threads=a.num_threads,
        seed=a.seed,
        session_ttl_s=a.session_ttl,
        session_kv_fraction=a.session_kv_fraction,
        device=a.device,
        unsafe_keep_prefix_cache_across_updates=a.unsafe_keep_prefix_cache_across_updates,
    )


def cmd_generate(a: argparse.Namespace) -> int:
    from asyncengine.llm import LLM
    from asyncengine.sampling_params import SamplingParams

    llm = LLM(config=config_from_args(a))
    prompts = a.prompt or ["What is reinforcement learning?", "Write a haiku about GPUs."]
    ids = [llm.chat_prompt([{"role": "user", "content": p}]) if a.chat else llm.encode(p) for p in prompts]
    sp = SamplingParams(
        max_tokens=a.max_tokens, temperature=a.temperature, top_p=a.top_p, top_k=a.top_k, seed=a.sampling_seed,
        logprobs=a.logprobs,
    )
    t0 = time.perf_counter()
    results = llm.generate(ids, sp, use_tqdm=not a.quiet)
    dt = time.perf_counter() - t0
    for prompt, res in zip(prompts, results):
        print(f"--- {prompt!r}\n{res.text}\n[{len(res.token_ids)} tokens, finish={res.finish_reason}, "
              f"mean logprob={sum(res.logprobs) / max(1, len(res.logprobs)):.4f}]")
    n = sum(len(r.token_ids) for r in results)
    print(f"{n} tokens in {dt:.2f} s ({n / dt:.1f} tok/s)")
    return 0


def cmd_serve(a: argparse.Namespace) -> int:
    from api.server import serve

    serve(a, config_from_args(a))
    return 0


def cmd_parity(a: argparse.Namespace) -> int:
    from asyncengine.parity import run_parity

    return run_parity(a, config_from_args(a))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="asyncengine", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="generate completions offline")
    add_engine_args(g)
    g.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    g.add_argument("--chat", action="store_true", help="wrap prompts in the chat template")
    g.add_argument("--max-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--logprobs", type=int, default=None)
    g.add_argument("--sampling-seed", type=int, default=None)
    g.add_argument("--quiet", action="store_true")
    g.set_defaults(func=cmd_generate)

    s = sub.add_parser("serve", help="OpenAI-compatible HTTP server")
    add_engine_args(s)
    _add_optional(s, "api.server", "add_serve_args")
    s.set_defaults(func=cmd_serve)

    b = sub.add_parser("bench", help="offline throughput on random prompts (bench/throughput.py compares with HF)")
    add_engine_args(b)
    _add_optional(b, "asyncengine.benchmark", "add_bench_args")
    b.set_defaults(func=lambda a: __import__("asyncengine.benchmark", fromlist=["run"]).run(a, config_from_args(a)))

    r = sub.add_parser("parity", help="rollout vs trainer logprob parity report")
    add_engine_args(r)
    _add_optional(r, "asyncengine.parity", "add_parity_args")
    r.set_defaults(func=cmd_parity)

    rl = sub.add_parser("rl-check", help="the RL loop's zero-LR / small-LR controls (asyncengine/rl/check.py)")
    _add_optional(rl, "asyncengine.rl.check", "add_rl_check_args")
    rl.set_defaults(func=lambda a: __import__("asyncengine.rl.check", fromlist=["run"]).run_rl_check(a))
    return parser


def _add_optional(p: argparse.ArgumentParser, module: str, fn: str) -> None:
    """Let a command module add its own flags (it may not be importable yet)."""
    try:
        mod = __import__(module, fromlist=[fn])
    except ImportError:
        return
    getattr(mod, fn)(p)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
