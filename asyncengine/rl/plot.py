"""The PNG of `asyncengine rl-check`: per-step max |Δ logprob| and KL of each configuration."""
from __future__ import annotations

from pathlib import Path
from typing import Any


def plot_controls(pairs: list[tuple[Any, Any]], learn: Any | None, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = (2 if pairs else 0) + (1 if learn is not None else 0)
    fig, axes = plt.subplots(1, panels, figsize=(6 * panels, 4.5), squeeze=False)
    axes = list(axes[0])
    if not pairs:  # the learning curve alone
        _plot_learning(axes[0], learn)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return
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
        _plot_learning(axes[2], learn)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_learning(ax: Any, learn: Any) -> None:
    steps = learn.steps["right"]
    ax.plot([m.step for m in steps], [m.mean_reward for m in steps], marker=".")
    ax.set_xlabel("step")
    ax.set_ylabel("mean reward")
    ax.set_title(f"learning: mean reward per step (LR {learn.config.lr:g})")
