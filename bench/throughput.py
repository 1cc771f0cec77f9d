"""Throughput on the default model vs HF transformers `generate` and the machine's speed of light.

Two workloads (greedy, ignore_eos, so every request makes exactly its new tokens):
  prefill-heavy: 64 prompts of 32-512 tokens, 128 new tokens each
  decode-heavy:  64 prompts of ~16 tokens, 512 new tokens each
For each workload and dtype it prints our generated tokens/s, HF `generate` tokens/s on
the same prompts (padded batches of 16, as users run it), the ratio, each side's fraction
of the workload's speed of light (bench/sol.py: the machine's FMA peak and streaming read
bandwidth measured by compiled probes at the start of this run and again before each
workload, each rate at the highest seen so far; FLOPs and bytes counted exactly per step),
the fraction of the bound with the KV reads not under the FMAs ("unhidden", also sol.py),
and the process's peak RSS while each side ran.

Our own server is a side too (ours-http, unless --no-http; bench/ours_http.py): `asyncengine
serve` in a child process for its turn, the same prompts as token ids sent at once as
plain POST /v1/completions, its process's CPU time and peak RSS: the view from outside,
like for like with llama.cpp's.

llama.cpp's own server is the last side when its binary is there (`--llamacpp auto`, the
default, finds the one `python bench/llamacpp.py --fetch` unpacks; `--llamacpp PATH` names
another; `off` skips it): one server per dtype with 64 slots, continuous batching, prompt
cache off, the same prompts as token ids all sent at once, greedy, exactly the new tokens,
on F32 / BF16 GGUFs of the engine's own weights (bench/llamacpp.py); its peak RSS is the
server process's.

Like for like: every side is warmed up (one short generate call on the first prompts)
before the timed call, the HF model is loaded untimed and dropped after its run (so our
peak RSS does not include it), and the side that runs first rotates each round.

    python bench/throughput.py                     # both workloads, fp32 and bf16 (long)
    python bench/throughput.py --dtypes float32 --workloads prefill --scale 0.25
    python bench/throughput.py --workloads decode --rounds 3   # medians over 3 rounds

This machine's speed drifts by tens of percent within minutes, so one run's ratio says
as much about when each side ran as about the code; --rounds N rotates the sides N
times and ends with the medians of the rounds' figures.
"""
from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

# Run as a script, bench/ leads sys.path and bench/kernels.py would shadow `kernels`.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from asyncengine.llm import LLM  # noqa: E402
from asyncengine.model_files import resolve_model  # noqa: E402
from asyncengine.sampling_params import SamplingParams  # noqa: E402
from bench.llamacpp import PeerError, Server, find_binary, prepared_ggufs, run_peer  # noqa: E402
from bench.ours_http import kv_blocks_for, run_ours_http  # noqa: E402
from bench.server_process import peak_rss_bytes, reset_peak_rss  # noqa: E402
from bench.sol import Machine, ModelCost, faster, measure_machine, sol_seconds  # noqa: E402

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


class Clock:
    """Wall and process CPU seconds of a `with` block (CPU: every thread of the process)."""

    wall: float
    cpu: float

    def __enter__(self) -> Clock:
        self._t, self._c = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall, self.cpu = time.perf_counter() - self._t, time.process_time() - self._c


def run_ours(llm: LLM, prompts: list[list[int]], new_tokens: int) -> Clock:
    sp = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    llm.generate(prompts[:2], sp.with_options(max_tokens=4), use_tqdm=False)  # warm-up
    # Nothing measured may hit blocks cached by the warm-up or an earlier round: every
    # prompt is computed, as HF computes it.
    llm.engine.reset_prefix_cache()
    with Clock() as clock:
        results = llm.generate(prompts, sp, use_tqdm=False)
    assert all(len(r.token_ids) == new_tokens for r in results)
    return clock


def run_hf(model_dir: Path, dtype: torch.dtype, prompts: list[list[int]], new_tokens: int, batch: int = 16) -> Clock:
    """HF `generate` tokens/s: loaded untimed, warmed up like ours (its first batch, 4 new
    tokens), then timed over padded batches of `batch`; the model is dropped on return."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype).eval()
    pad = model.config.eos_token_id if isinstance(model.config.eos_token_id, int) else 0

    def generate(chunk: list[list[int]], new: int) -> None:
        width = max(len(p) for p in chunk)
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in chunk])  # left padding
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk])
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,
                                 do_sample=False, pad_token_id=pad)
        assert out.shape[1] == width + new

    generate(prompts[:batch], 4)  # warm-up, as run_ours does
    with Clock() as clock:
        for i in range(0, len(prompts), batch):
            generate(prompts[i : i + batch], new_tokens)
    return clock


@dataclass(frozen=True, slots=True)
class Side:
    tok_s: float  # generated tokens per wall second
    cpu_tok_s: float  # generated tokens per second of the process's CPU time / threads
    peak_rss: int  # bytes, the process's peak while this side ran


def timed_side(run: Callable[[], Clock], tokens: int) -> Side:
    reset_peak_rss()
    clock = run()
    return Side(tokens / clock.wall, tokens * torch.get_num_threads() / clock.cpu, peak_rss_bytes())


def outside_side(measured: tuple[float, float, int], tokens: int) -> Side:
    """A server process's side from (wall s, its CPU s, its peak RSS)."""
    wall, cpu, rss = measured
    return Side(tokens / wall, tokens * torch.get_num_threads() / cpu, rss)


def run_llamacpp(server: Server | None, prompts: list[list[int]], new_tokens: int) -> Side:
    """llama.cpp's server on the same prompts (bench/llamacpp.py); its own process's CPU
    time and peak RSS."""
    assert server is not None
    return outside_side(run_peer(server, prompts, new_tokens), len(prompts) * new_tokens)


def http_flags(a: argparse.Namespace, llm: LLM, model_dir: Path, dtype_name: str, prompts: list[list[int]],
               new: int) -> list[str]:
    """`asyncengine serve` flags for the ours-http side: the in-process engine's settings,
    a KV pool that holds the whole workload."""
    c = llm.engine.config
    return ["--model", str(model_dir), "--dtype", dtype_name, "--max-num-seqs", str(c.max_num_seqs),
            "--max-num-batched-tokens", str(c.max_num_batched_tokens),
            "--num-kv-blocks", str(kv_blocks_for(prompts, new, c.block_size))] + (
            ["--non-deterministic"] if a.non_deterministic else [])


def measure_round(a: argparse.Namespace, r: int, llm: LLM, model_dir: Path, dtype_name: str,
                  prompts: list[list[int]], new: int, peer: Server | None) -> dict[str, Side]:
    """One round: ours, our server over HTTP (unless --no-http), HF (unless --skip-hf) and
    llama.cpp (when there is a peer server); the side that runs first rotates each round."""
    tokens = len(prompts) * new
    runs: dict[str, Callable[[], Side]] = {
        "ours": lambda: timed_side(lambda: run_ours(llm, prompts, new), tokens),
        "ours-http": lambda: outside_side(
            run_ours_http(http_flags(a, llm, model_dir, dtype_name, prompts, new), prompts, new), tokens),
        "HF": lambda: timed_side(lambda: run_hf(model_dir, DTYPES[dtype_name], prompts, new), tokens),
        "llama.cpp": lambda: run_llamacpp(peer, prompts, new),
    }
    names = (["ours"] + ([] if a.no_http else ["ours-http"]) + ([] if a.skip_hf else ["HF"])
             + ([] if peer is None else ["llama.cpp"]))
    order = names[r % len(names):] + names[: r % len(names)]
    sides = {}
    for name in order:
        try:
            sides[name] = runs[name]()
        except PeerError as e:  # the peer's own failure: reported, and this round goes on without it
            print(f"  llama.cpp failed this round, left out: {e}", flush=True)
    return {name: sides[name] for name in names if name in sides}


def report(name: str, n: int, new: int, bounds: tuple[float, float], rounds: list[dict[str, Side]]) -> None:
    """Per round: tokens/s, % of the speed of light (over wall time, and over the CPU time
    per thread: what the rate would be holding the cores alone), peak RSS, ours / each
    peer; then medians over rounds. bounds: the speed of light and the bound with the KV
    reads not under the FMAs (sol.py), in seconds."""
    sol_s, serial_s = bounds
    sol_tok_s, serial_tok_s = n * new / sol_s, n * new / serial_s

    def fmt(who: str, s: Side) -> str:
        return (f"{who} {s.tok_s:7.1f} tok/s ({100 * s.tok_s / sol_tok_s:5.1f}% of SOL, "
                f"{100 * s.tok_s / serial_tok_s:5.1f}% unhidden; per CPU time "
                f"{s.cpu_tok_s:7.1f}, {100 * s.cpu_tok_s / sol_tok_s:5.1f}%; peak RSS {s.peak_rss / 2**30:.2f} GiB)")

    def line(sides: dict[str, Side]) -> str:
        ours, http = sides["ours"], sides.get("ours-http")
        peers = [f"{fmt(who, s)} | ours/{who} {ours.tok_s / s.tok_s:5.2f}x"
                 + (f" | ours-http/{who} {http.tok_s / s.tok_s:5.2f}x" if http is not None and who != "ours-http" else "")
                 for who, s in sides.items() if who != "ours"]
        return " | ".join([fmt("ours", ours), *peers])

    print(f"  {name:8s} {n} prompts x {new} new: speed of light {sol_tok_s:7.1f} tok/s ({sol_s:.2f} s); "
          f"with the KV reads not under the FMAs (unhidden) {serial_tok_s:7.1f} tok/s ({serial_s:.2f} s)")
    for r, sides in enumerate(rounds):
        names = list(sides)
        print(f"  {name:8s} round {r} ({names[r % len(names)]} first): {line(sides)}", flush=True)
    if len(rounds) > 1:
        med = statistics.median

        def median_side(who: str) -> Side:
            sides = [r[who] for r in rounds]
            return Side(med(s.tok_s for s in sides), med(s.cpu_tok_s for s in sides), max(s.peak_rss for s in sides))

        every = [who for who in rounds[0] if all(who in r for r in rounds)]
        pairs = [("ours", who) for who in every if who != "ours"]
        pairs += [("ours-http", who) for who in every if "ours-http" in every and who not in ("ours", "ours-http")]
        ratios = "".join(f", median {x}/{y} {med(r[x].tok_s / r[y].tok_s for r in rounds):.2f}x" for x, y in pairs)
        print(f"  {name:8s} medians over {len(rounds)} rounds (RSS: max): "
              f"{line({who: median_side(who) for who in every})}{ratios}", flush=True)


def add_workload_args(ap: argparse.ArgumentParser) -> None:
    """The model, dtypes, workloads and scale flags (shared with bench/async_scheduling.py)."""
    ap.add_argument("--model", default=None)
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--workloads", default="prefill,decode")
    ap.add_argument("--scale", type=float, default=1.0, help="shrink prompts count and new tokens")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_workload_args(ap)
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--no-http", action="store_true", help="skip our own server driven over HTTP (ours-http)")
    ap.add_argument("--non-deterministic", action="store_true")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--rounds", type=int, default=1, help="rotate which side runs first this many times")
    ap.add_argument("--llamacpp", default="auto", metavar="PATH|auto|off",
                    help="llama-server binary for the llama.cpp peer (auto: the one bench/llamacpp.py --fetch got)")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    model_dir = resolve_model(a.model)
    print(f"model {model_dir}  threads {torch.get_num_threads()}  deterministic {not a.non_deterministic}")
    machine: Machine = measure_machine()
    print(f"machine: {machine.describe()}")
    binary = find_binary(a.llamacpp)
    if binary is None:
        print(f"llama.cpp peer skipped: {'--llamacpp off' if a.llamacpp == 'off' else 'no llama-server; get it with python bench/llamacpp.py --fetch'}")
    elif model_dir != resolve_model(None):
        binary = None  # its GGUFs hold the default model's weights only
        print("llama.cpp peer skipped: it runs the default model only")
    for dtype_name in a.dtypes.split(","):
        machine = run_dtype(a, model_dir, machine, dtype_name, binary)


def run_dtype(a: argparse.Namespace, model_dir: Path, machine: Machine, dtype_name: str,
              binary: Path | None) -> Machine:
    """Every selected workload in one dtype: our LLM and (with a binary) one llama-server.
    The probes run again before each workload; its speed of light takes each rate at the
    highest seen so far (sol.faster), which is also returned."""
    llm = LLM(model=str(model_dir), dtype=dtype_name, deterministic=not a.non_deterministic)
    cost, config = ModelCost.of(llm), llm.engine.config
    print(f"\n[{dtype_name}] {(cost.body_params + cost.head_params) / 1e6:.1f} M matmul parameters, "
          f"{cost.weight_bytes / 1e6:.0f} MB of matmul weights read per step")
    chosen = {k: v for k, v in workloads(a.scale, llm.engine.model_info.vocab_size).items() if k in a.workloads.split(",")}
    peer = None
    if binary is not None and chosen:
        longest = max(max(map(len, prompts)) + new for prompts, new in chosen.values())
        peer = Server(binary, prepared_ggufs()[dtype_name], dtype_name, longest, torch.get_num_threads(),
                      Path(tempfile.gettempdir()) / f"llamacpp-{dtype_name}.log")
    try:
        for name, (prompts, new) in chosen.items():
            now = measure_machine()
            machine = faster(machine, now)
            print(f"  {name:8s} probes again: {now.describe()}")
            lengths, limits = [len(p) for p in prompts], (config.max_num_batched_tokens, config.max_num_seqs)
            sol_s = sol_seconds(cost, machine, lengths, new, *limits)
            serial_s = sol_seconds(cost, machine, lengths, new, *limits, kv_hidden=False)
            rounds = [measure_round(a, r, llm, model_dir, dtype_name, prompts, new, peer) for r in range(a.rounds)]
            report(name, len(prompts), new, (sol_s, serial_s), rounds)
    finally:
        if peer is not None:
            peer.close()
    del llm
    return machine


if __name__ == "__main__":
    main()
