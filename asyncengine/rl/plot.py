"""The PNG of `asyncengine rl-check`: per-step max |Δ logprob| and KL of each configuration."""
from __future__ import annotations

from pathlib import Path
from typing import Any


def plot_controls(pairs: list[tuple[Any, Any]], learn: Any | None, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = 3 if learn is not None else 2
    fig, axes = plt.subplots(1, panels, figsize=(6 * panels, 4.5))
    for c, right in pairs:
        steps = [m.step for m in c.steps]
        style = "-" if right is None else "--"
        label = f"{c.control}: {c.name}"
        axes[0].plot(steps, [max(m.max_abs, 1e-12) for m in c.steps], style, marker=".", label=label)
        axes[1].plot(steps, [max(m.kl_k3, 1e-18) for m in c.steps], style, marker=".", label=label)
    axes[0].axhline(1e-4, color="k", linewidth=0.8, linestyle=":")
    axes[1].axhline(1e-8, color="k", linewidth=0.8, linestyle=":")
    for ax, title in zip(axes, ("max |Δ logprob| (rollout vs trainer)", "KL(rollout || trainer), K3")):
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_title(title)
    axes[0].legend(fontsize=6, loc="best")
    if learn is not None:
        steps = learn.steps["right"]
        axes[2].plot([m.step for m in steps], [m.mean_reward for m in steps], marker=".")
        axes[2].set_xlabel("step")
        axes[2].set_title(f"learning: mean reward (LR {learn.config.lr:g})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
