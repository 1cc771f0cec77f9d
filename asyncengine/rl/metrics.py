"""Per-step rollout-vs-trainer metrics of the RL loop (the blog's diagnostics)."""
from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass

import torch

from asyncengine.parity import report


@dataclass(slots=True)
class StepMetrics:
    step: int
    num_tokens: int
    mean_abs: float  # mean |rollout - trainer logprob|
    max_abs: float
    kl_k3: float  # K3 estimate of KL(rollout || trainer)
    outside_20pct: float  # share of importance ratios outside [0.8, 1.2]
    outside_01pct: float  # ... outside [0.999, 1.001]
    mean_reward: float
    tokens_per_version: dict[int, int]

    def line(self) -> str:
        versions = ",".join(f"v{v}:{n}" for v, n in sorted(self.tokens_per_version.items()))
        return (f"step {self.step:3d}  tokens {self.num_tokens:5d}  mean|Δ| {self.mean_abs:.2e}  "
                f"max|Δ| {self.max_abs:.2e}  KL(k3) {self.kl_k3:.2e}  out[0.8,1.2] {100 * self.outside_20pct:5.2f}%  "
                f"out[0.999,1.001] {100 * self.outside_01pct:5.2f}%  reward {self.mean_reward:.3f}  [{versions}]")

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def step_metrics(step: int, rollout: torch.Tensor, trainer: torch.Tensor, rewards: list[float],
                 versions: list[int]) -> StepMetrics:
    """rollout, trainer: [N] logprobs of the same tokens; versions: [N] weight versions."""
    rep = report(rollout, trainer)
    return StepMetrics(step, rep.num_tokens, rep.mean_abs, rep.max_abs, rep.kl_k3, rep.outside_20pct,
                       rep.outside_01pct, sum(rewards) / max(1, len(rewards)), dict(Counter(versions)))
