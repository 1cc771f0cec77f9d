"""Decode throughput vs batch size on the default model, against the speed of light.

For each batch size B (default 1, 2, 4, ..., 256) B prompts of ~16 tokens each generate
--new tokens (greedy, ignore_eos), all at once in one engine with max_num_seqs >= B. The
figure is decode tokens/s: the tokens made after every request has its first token
(the prefill, and the first token it yields, excluded; the token budget fits every batch's
prefill in one step, so that is B x (new - 1) tokens) over the time from that step's end
to the last step's end (also per the process's CPU time per thread: the rate holding the
cores alone, which is what a shared machine's figure can be compared by). The speed of light is bench/sol.py's for the same decode steps
(decode_sol_seconds: per step max(FLOPs / FMA peak, bytes / read bandwidth), both measured
by the compiled probes at the start of this run).

    python bench/batch_curve.py --out docs/decode_batch_curve.png    # the full curve (long)
    python bench/batch_curve.py --quick                              # batches 1, 4, 16; 8 new

It prints the table and, with --out, writes a PNG: tokens/s against the batch (log2 x,
log y), ours and the speed of light per dtype.
"""
from __future__ import annotations

import argparse
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

# Run as a script, bench/ leads sys.path and bench/kernels.py would shadow `kernels`.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from asyncengine.llm import LLM  # noqa: E402
from asyncengine.sampling_params import SamplingParams  # noqa: E402
from bench.sol import Machine, ModelCost, decode_sol_seconds  # noqa: E402

BATCHES = (1, 2, 4, 8, 16, 32, 64, 128, 256)
QUICK_BATCHES = (1, 4, 16)


@dataclass(frozen=True, slots=True)
class Point:
    dtype: str
    batch: int
    decode_tokens: int  # tokens made after every request had its first
    seconds: float  # wall time of the steps that made them
    cpu_seconds: float  # the process's CPU time over those steps, per intra-op thread
    sol_tok_s: float  # the speed of light of the same decode steps

    @property
    def tok_s(self) -> float:
        return self.decode_tokens / self.seconds

    @property
    def cpu_tok_s(self) -> float:
        """The rate per CPU time: what it would be holding the cores alone (a shared machine)."""
        return self.decode_tokens / self.cpu_seconds


def prompts(batch: int, vocab: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(100, vocab - 100) for _ in range(rng.randint(14, 18))] for _ in range(batch)]


def decode_run(llm: LLM, batch_prompts: list[list[int]], new_tokens: int) -> tuple[int, float, float]:
    """Step the engine over all prompts at once; (decode tokens, their wall seconds, the
    process's CPU seconds over them per intra-op thread)."""
    engine, sp = llm.engine, SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    llm.generate(batch_prompts[:2], sp.with_options(max_tokens=4), use_tqdm=False)  # warm-up
    engine.reset_prefix_cache()  # every prompt is computed, none hits the warm-up's blocks
    for i, p in enumerate(batch_prompts):
        engine.add_request(f"curve-{len(batch_prompts)}-{i}", p, sp)
    made: dict[str, int] = {}
    start, cpu, decoded = None, 0.0, 0
    while engine.has_unfinished():
        outs = engine.step()
        for out in outs:
            made[out.request_id] = made.get(out.request_id, 0) + len(out.token_ids)
        if start is not None:
            decoded += sum(len(out.token_ids) for out in outs)
        elif len(made) == len(batch_prompts) and all(made.values()):
            start, cpu = time.perf_counter(), time.process_time()  # every request has its first token
    assert start is not None and all(n == new_tokens for n in made.values())
    assert decoded == len(batch_prompts) * (new_tokens - 1)  # one prefill step: all decode together
    return decoded, time.perf_counter() - start, (time.process_time() - cpu) / torch.get_num_threads()


def measure(llm: LLM, machine: Machine, dtype: str, batch: int, new_tokens: int) -> Point:
    batch_prompts = prompts(batch, llm.engine.model_info.vocab_size)
    decoded, seconds, cpu = decode_run(llm, batch_prompts, new_tokens)
    sol_s = decode_sol_seconds(ModelCost.of(llm), machine, [len(p) for p in batch_prompts], new_tokens)
    return Point(dtype, batch, decoded, seconds, cpu, batch * (new_tokens - 1) / sol_s)


def table(points: list[Point]) -> str:
    """The curve as text: one row per (dtype, batch); per CPU: tokens per CPU second per thread."""
    rows = [f"{'dtype':9s} {'batch':>5s} {'ours tok/s':>11s} {'SOL tok/s':>11s} {'% of SOL':>8s}"
            f" {'per CPU':>9s} {'% of SOL':>8s}"]
    rows += [f"{p.dtype:9s} {p.batch:5d} {p.tok_s:11.1f} {p.sol_tok_s:11.1f} {100 * p.tok_s / p.sol_tok_s:8.1f}"
             f" {p.cpu_tok_s:9.1f} {100 * p.cpu_tok_s / p.sol_tok_s:8.1f}" for p in points]
    return "\n".join(rows)


def plot(points: list[Point], out: Path, title: str) -> None:
    """Tokens/s vs batch (log2 x, log y): ours solid, the speed of light dashed, per dtype."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")  # no display here
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, dtype in enumerate(dict.fromkeys(p.dtype for p in points)):
        pts = [p for p in points if p.dtype == dtype]
        batches = [p.batch for p in pts]
        ax.plot(batches, [p.tok_s for p in pts], "o-", color=f"C{i}", label=f"ours {dtype}")
        ax.plot(batches, [p.sol_tok_s for p in pts], "--", color=f"C{i}", label=f"speed of light {dtype}")
    ax.set_xscale("log", base=2)
    ax.set_xticks(sorted({p.batch for p in points}))
    ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())  # 1, 2, 4 rather than 2^k
    ax.set_yscale("log")
    ax.set_xlabel("sequences decoding together (batch)")
    ax.set_ylabel("decode tokens/s")
    ax.set_title(title, fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)


def curve(model: str, machine: Machine, dtypes: list[str], batches: tuple[int, ...], new_tokens: int,
          deterministic: bool) -> list[Point]:
    points = []
    for dtype in dtypes:
        # max_model_len: the longest prompt + new, so the KV pool holds the largest batch, no
        # more; a token budget that prefills every batch in one step, so decoding starts together.
        llm = LLM(model=model, dtype=dtype, deterministic=deterministic, max_num_seqs=max(batches),
                  max_model_len=18 + new_tokens, max_num_batched_tokens=max(2048, 18 * max(batches)))
        for batch in batches:
            points.append(measure(llm, machine, dtype, batch, new_tokens))
            print(table(points[-1:]).splitlines()[1], flush=True)
        del llm
    return points


def main() -> None:
    from asyncengine.model_files import resolve_model
    from bench.sol import measure_machine

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--batches", default=",".join(map(str, BATCHES)))
    ap.add_argument("--new", type=int, default=64, help="new tokens per sequence")
    ap.add_argument("--quick", action="store_true", help=f"batches {QUICK_BATCHES}, 8 new tokens")
    ap.add_argument("--out", type=Path, default=None, help="write the PNG here (e.g. docs/decode_batch_curve.png)")
    ap.add_argument("--non-deterministic", action="store_true")
    a = ap.parse_args()
    batches = QUICK_BATCHES if a.quick else tuple(int(b) for b in a.batches.split(","))
    new_tokens = 8 if a.quick else a.new
    if new_tokens < 2:
        raise SystemExit("--new must be at least 2: the first token comes from the prefill")
    model_dir = resolve_model(a.model)
    machine = measure_machine()
    print(f"model {model_dir}  threads {torch.get_num_threads()}  deterministic {not a.non_deterministic}\n"
          f"machine: {machine.describe()}\n{table([]).splitlines()[0]}", flush=True)
    points = curve(str(model_dir), machine, a.dtypes.split(","), batches, new_tokens, not a.non_deterministic)
    print(f"\n{table(points)}")
    if a.out is not None:
        plot(points, a.out, f"{model_dir.name}, ~16-token prompts, {new_tokens} new, {torch.get_num_threads()} threads")
        print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
