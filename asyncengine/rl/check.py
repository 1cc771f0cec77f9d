"""`asyncengine rl-check`: the zero-LR and small-LR controls of the RL loop, stated in figures.

Right configuration: processed logprobs, fp32 head, prefix cache dropped on update, the
trainer recomputing each token under its own weight version. Each misconfiguration the
blog fixed is run the same way and flagged when its max |Δ logprob| is >= 100x the right
configuration's in the same control:
- zero LR: raw logprobs to a trainer that applies temperature and top-p (the engine's raw
  logprobs of the same rollouts); a bf16 lm_head (its own server);
- small LR, synchronous updates: a prefix cache kept across updates (a server with the
  unsafe demonstration option);
- small LR, in-flight updates (keep): a trainer that assumes one version per sequence.
Optionally (--learn-steps) a learning run: LR > 0, the mean reward per step.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from asyncengine.rl.loop import RunConfig, RunResult, run_on_server, server
from asyncengine.rl.metrics import StepMetrics

FLAG_RATIO = 100.0
MAX_ABS_BOUND, KL_BOUND = 1e-4, 1e-8


def add_rl_check_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="HF checkpoint directory (default: SmolLM2-135M-Instruct)")
    p.add_argument("--steps", type=int, default=20, help="steps of each zero-LR run")
    p.add_argument("--lr-steps", type=int, default=6, help="steps of each small-LR run")
    p.add_argument("--small-lr", type=float, default=1e-5)
    p.add_argument("--num-prompts", type=int, default=4)
    p.add_argument("--group-size", type=int, default=4)
    p.add_argument("--max-tokens", type=int, default=24)
    p.add_argument("--learn-steps", type=int, default=0, help="also run a learning run of this many steps")
    p.add_argument("--learn-lr", type=float, default=2e-5)
    p.add_argument("--learn-only", action="store_true", help="only the learning run (no controls)")
    p.add_argument("--max-operand", type=int, default=20, help="the additions' operands are 0..this")
    p.add_argument("--plot", default="rl_check.png", help="PNG of the per-step curves ('' for none)")
    p.add_argument("--json", default="", help="write every per-step figure to this JSON file")
    p.add_argument("--learn-json", default="",
                   help="a learning run's --json file from an earlier rl-check: shown in the summary and plot")
    p.add_argument("--workdir", default="", help="server logs (default: a temporary directory)")
    # The trainer (fp32 weights, gradients, Adam state) shares the machine with each server:
    # a server sizing its KV pool from free memory would take what the trainer needs.
    p.add_argument("--server-kv-gb", type=float, default=1.0,
                   help="KV cache of each server, GB (its rollouts need far less than 1 GB)")


@dataclass(slots=True)
class Control:
    """One configuration's per-step series within a control, and its verdict."""

    control: str
    name: str
    steps: list[StepMetrics]

    @property
    def max_abs(self) -> float:
        return max(m.max_abs for m in self.steps)

    @property
    def max_kl(self) -> float:
        return max(m.kl_k3 for m in self.steps)


def _runs(a: argparse.Namespace) -> dict[str, tuple[tuple[str, ...], list[RunConfig]]]:
    """Server name -> (its flags, the runs against it)."""
    base = dict(num_prompts=a.num_prompts, group_size=a.group_size, max_tokens=a.max_tokens,
                max_operand=a.max_operand)
    learn = RunConfig("learn", steps=a.learn_steps, lr=a.learn_lr, seed=1, **base)
    if a.learn_only:
        return {"fp32-head": ((), [learn])}
    right = [RunConfig("zero-lr", steps=a.steps, **base),
             RunConfig("small-lr-sync", steps=a.lr_steps, lr=a.small_lr, **base),
             RunConfig("small-lr-inflight", steps=a.lr_steps, lr=a.small_lr, inflight=True,
                       **{**base, "max_tokens": 2 * a.max_tokens})]
    if a.learn_steps:
        right.append(learn)
    return {"fp32-head": ((), right),
            "bf16-head": (("--lm-head-dtype", "bfloat16"), [RunConfig("zero-lr-bf16-head", steps=a.steps, **base)]),
            "prefix-kept": (("--unsafe-keep-prefix-cache-across-updates",),
                            [RunConfig("small-lr-sync-prefix-kept", steps=a.lr_steps, lr=a.small_lr, **base)])}


async def run_all(a: argparse.Namespace, model_dir: Path, workdir: Path) -> dict[str, RunResult]:
    results: dict[str, RunResult] = {}
    for name, (flags, configs) in _runs(a).items():
        flags = ("--kv-cache-memory-gb", str(a.server_kv_gb), *flags)
        with server(model_dir, flags, workdir / f"server-{name}.log") as srv:
            for cfg in configs:
                results[cfg.name] = await run_on_server(cfg, model_dir, srv.url)
    return results


def controls(results: dict[str, RunResult]) -> list[tuple[Control, Control | None]]:
    """(configuration, the right configuration it is compared with; None for a right one)."""
    z, s, i = results["zero-lr"].steps, results["small-lr-sync"].steps, results["small-lr-inflight"].steps
    zr = Control("zero-LR", "right configuration", z["right"])
    sr = Control("small-LR sync", "right configuration", s["right"])
    ir = Control("small-LR in flight (keep)", "right: per-token versions", i["right"])
    out: list[tuple[Control, Control | None]] = [
        (zr, None),
        (Control("zero-LR", "raw logprobs, trainer applies T/top-p", z["raw"]), zr),
        (Control("zero-LR", "bf16 lm_head", results["zero-lr-bf16-head"].steps["right"]), zr),
        (sr, None),
        (Control("small-LR sync", "prefix cache kept across updates",
                 results["small-lr-sync-prefix-kept"].steps["right"]), sr),
        (ir, None),
        (Control("small-LR in flight (keep)", "one version per sequence", i["one_version"]), ir),
    ]
    for key, label in (("one_version_before_switch", "one version: tokens before the switch"),
                       ("one_version_after_switch", "one version: tokens after the switch")):
        if key in i:
            out.append((Control("small-LR in flight (keep)", label, i[key]), ir))
    return out


def verdict(c: Control, right: Control | None) -> tuple[str, bool]:
    """The summary line of a configuration and whether it is as it must be."""
    head = f"{c.control:27s} {c.name:40s} max|Δ| {c.max_abs:.2e}  max KL {c.max_kl:.2e}"
    if right is None:
        ok = c.max_abs <= MAX_ABS_BOUND and (c.control != "zero-LR" or c.max_kl <= KL_BOUND)
        bound = f"<= {MAX_ABS_BOUND:g}" + (f", KL <= {KL_BOUND:g}" if c.control == "zero-LR" else "")
        return f"{head}  every step {bound}: {'PASS' if ok else 'FAIL'}", ok
    ratio = c.max_abs / max(right.max_abs, 1e-30)
    if "before the switch" in c.name:  # must NOT be flagged: exact up to the switch
        ok = c.max_abs <= MAX_ABS_BOUND
        return f"{head}  {ratio:9.1f}x right: {'exact (PASS)' if ok else 'MISMATCH (FAIL)'}", ok
    ok = ratio >= FLAG_RATIO
    return f"{head}  {ratio:9.1f}x right: {'FLAGGED' if ok else 'NOT FLAGGED (FAIL)'}", ok


def save_runs(results: dict[str, RunResult], path: Path) -> None:
    """Every run's configuration, timings and per-step figures, as JSON."""
    path.write_text(json.dumps({n: {"config": asdict(r.config), "wall_s": r.wall_s, "transfer_s": r.transfer_s,
                                    "steps": {k: [m.as_dict() for m in v] for k, v in r.steps.items()}}
                                for n, r in results.items()}, indent=1))


def load_run(path: Path, name: str) -> RunResult:
    """Run `name` of an rl-check --json file."""
    saved = json.loads(path.read_text())
    if name not in saved:
        raise SystemExit(f"{path}: no run named {name!r} (it has {sorted(saved)})")
    run = saved[name]
    steps = {k: [StepMetrics(**{**m, "tokens_per_version": {int(v): n for v, n in m["tokens_per_version"].items()}})
                 for m in series] for k, series in run["steps"].items()}
    return RunResult(RunConfig(**run["config"]), steps, run["transfer_s"], run["wall_s"])


def run_rl_check(a: argparse.Namespace) -> int:
    from asyncengine.model_files import resolve_model

    model_dir = resolve_model(a.model)
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(a.workdir or tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        results = asyncio.run(run_all(a, model_dir, workdir))
    pairs = [] if a.learn_only else controls(results)
    print(f"\nrl-check: model {model_dir.name}, {a.num_prompts} prompts x {a.group_size} samples, "
          f"{a.max_tokens} tokens, T=0.8 top_p=0.95, operands 0..{a.max_operand}, "
          + ("learning run only" if a.learn_only else
             f"zero-LR {a.steps} steps, small LR {a.small_lr:g} x {a.lr_steps} steps"))
    ok = True
    for c, right in pairs:
        line, good = verdict(c, right)
        ok &= good
        print(line)
    for name, r in results.items():
        t = sorted(r.transfer_s)
        print(f"{name:27s} weight sync per step (start..finish): median {1000 * t[len(t) // 2]:.0f} ms, "
              f"max {1000 * t[-1]:.0f} ms; run wall time {r.wall_s:.0f} s")
    if a.learn_json and "learn" not in results:
        results["learn"] = load_run(Path(a.learn_json), "learn")
        print(f"learning run from {a.learn_json}: {results['learn'].config}")
    if "learn" in results:
        rewards = [m.mean_reward for m in results["learn"].steps["right"]]
        k = max(1, len(rewards) // 4)
        print(f"learning: mean reward per step {' '.join(f'{x:.2f}' for x in rewards)}; first {k} steps "
              f"{sum(rewards[:k]) / k:.3f} -> last {k} steps {sum(rewards[-k:]) / k:.3f}")
    if a.json:
        save_runs(results, Path(a.json))
    if a.plot:
        from asyncengine.rl.plot import plot_controls

        plot_controls(pairs, results.get("learn"), Path(a.plot))
        print(f"plot: {a.plot}")
    print("verdict: " + ("every control as expected" if ok else "SOME CONTROL FAILED"))
    return 0 if ok else 1
