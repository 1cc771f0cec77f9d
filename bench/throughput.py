"""Throughput on the default model vs HF transformers `generate`, in the same run.

Two workloads (greedy, ignore_eos, so every request makes exactly its new tokens):
  prefill-heavy: 64 prompts of 32-512 tokens, 128 new tokens each
  decode-heavy:  64 prompts of ~16 tokens, 512 new tokens each
For each workload and dtype it prints our generated tokens/s, HF `generate` tokens/s on
the same prompts (padded batches of 16, as users run it), the ratio, and the fraction
of the compute roofline: a 2048^3 matmul's GFLOP/s measured in this run (the mean of one
right before and one right after our run), divided into the workload's
2 x parameters x (prompt + generated tokens) FLOPs.

    python bench/throughput.py                     # both workloads, fp32 and bf16 (long)
    python bench/throughput.py --dtypes float32 --workloads prefill --scale 0.25
    python bench/throughput.py --workloads decode --rounds 3   # ours and HF alternate

This machine's speed drifts by tens of percent within minutes, so one run's ratio says
as much about when each side ran as about the code; --rounds N alternates ours and HF N
times and ends with the median of the rounds' ratios.
"""
from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

# Run as a script, bench/ leads sys.path and bench/kernels.py would shadow `kernels`.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from asyncengine.llm import LLM  # noqa: E402
from asyncengine.model_files import resolve_model  # noqa: E402
from asyncengine.sampling_params import SamplingParams  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def workloads(scale: float, vocab: int, seed: int = 0) -> dict[str, tuple[list[list[int]], int]]:
    rng = random.Random(seed)
    n = max(2, int(64 * scale))

    def prompt(length: int) -> list[int]:
        return [rng.randrange(100, vocab - 100) for _ in range(length)]

    return {
        "prefill": ([prompt(rng.randint(32, 512)) for _ in range(n)], max(8, int(128 * scale))),
        "decode": ([prompt(rng.randint(14, 18)) for _ in range(n)], max(16, int(512 * scale))),
    }


def matmul_gflops(dtype: torch.dtype, n: int = 2048, reps: int = 5) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    torch.mm(a, b)
    t = time.perf_counter()
    for _ in range(reps):
        torch.mm(a, b)
    return 2 * n**3 * reps / (time.perf_counter() - t) / 1e9


def run_ours(llm: LLM, prompts: list[list[int]], new_tokens: int) -> float:
    sp = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    llm.generate(prompts[:2], sp.with_options(max_tokens=4), use_tqdm=False)  # warm-up
    # Nothing measured may hit blocks cached by the warm-up or an earlier round: every
    # prompt is computed, as HF computes it.
    llm.engine.reset_prefix_cache()
    t = time.perf_counter()
    results = llm.generate(prompts, sp, use_tqdm=False)
    dt = time.perf_counter() - t
    assert all(len(r.token_ids) == new_tokens for r in results)
    return len(prompts) * new_tokens / dt


def run_hf(model_dir: Path, dtype: torch.dtype, prompts: list[list[int]], new_tokens: int, batch: int = 16) -> float:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype).eval()
    pad = model.config.eos_token_id if isinstance(model.config.eos_token_id, int) else 0
    t = time.perf_counter()
    for i in range(0, len(prompts), batch):
        chunk = prompts[i : i + batch]
        width = max(len(p) for p in chunk)
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in chunk])  # left padding
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk])
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                 do_sample=False, pad_token_id=pad)
        assert out.shape[1] == width + new_tokens
    return len(prompts) * new_tokens / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--workloads", default="prefill,decode")
    ap.add_argument("--scale", type=float, default=1.0, help="shrink prompts count and new tokens")
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--non-deterministic", action="store_true")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--rounds", type=int, default=1, help="alternate ours and HF this many times")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    model_dir = resolve_model(a.model)
    print(f"model {model_dir}  threads {torch.get_num_threads()}  deterministic {not a.non_deterministic}")
    for dtype_name in a.dtypes.split(","):
        llm = LLM(model=str(model_dir), dtype=dtype_name, deterministic=not a.non_deterministic)
        params = sum(t.numel() for t in llm.engine.model.gemm_weights())
        print(f"\n[{dtype_name}] {params / 1e6:.1f} M matmul parameters")
        for name, (prompts, new) in workloads(a.scale, llm.engine.model_info.vocab_size).items():
            if name not in a.workloads.split(","):
                continue
            ratios = [measure(a, llm, model_dir, dtype_name, params, name, prompts, new) for _ in range(a.rounds)]
            if a.rounds > 1 and not a.skip_hf:
                print(f"  {name:8s} median ratio over {a.rounds} rounds: {statistics.median(ratios):5.2f}x "
                      f"(rounds: {', '.join(f'{r:.2f}' for r in ratios)})", flush=True)
        del llm


def measure(a: argparse.Namespace, llm: LLM, model_dir: Path, dtype_name: str, params: int, name: str,
            prompts: list[list[int]], new: int) -> float:
    """One round: ours (the roofline's matmul measured right before and right after it),
    then HF; prints the line and returns ours / HF (0.0 with --skip-hf)."""
    before = matmul_gflops(DTYPES[dtype_name])
    ours = run_ours(llm, prompts, new)
    after = matmul_gflops(DTYPES[dtype_name])
    gflops = (before + after) / 2
    print(f"  {name:8s} matmul 2048^3: {before:.1f} GFLOP/s before, {after:.1f} after", flush=True)
    tokens = sum(len(p) for p in prompts) + len(prompts) * new
    roof = 2 * params * tokens / 1e9 / gflops  # seconds at peak
    ours_time = len(prompts) * new / ours
    line = (f"  {name:8s} {len(prompts)} prompts x {new} new: ours {ours:7.1f} tok/s, "
            f"roofline {100 * roof / ours_time:5.1f}%")
    if a.skip_hf:
        print(line, flush=True)
        return 0.0
    hf = run_hf(model_dir, DTYPES[dtype_name], prompts, new)
    hf_time = len(prompts) * new / hf
    print(line + f" | HF {hf:6.1f} tok/s ({100 * roof / hf_time:5.1f}% roofline) | ratio {ours / hf:5.2f}x", flush=True)
    return ours / hf


if __name__ == "__main__":
    main()
