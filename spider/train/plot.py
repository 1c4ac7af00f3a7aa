"""The curves of a training run (metrics.jsonl lines) as one PNG: teacher KL (sampled and held-out),
loss, learning rate and gradient norm, tokens per second."""

from __future__ import annotations

from pathlib import Path
from typing import Any

PANELS = (
    ("teacher reverse KL (nats/token)", ("teacher_kl", "eval_teacher_kl", "post_kl")),
    ("loss (summed)", ("loss",)),
    ("learning rate", ("learning_rate",)),
    ("gradient norm", ("grad_norm",)),
    ("aligned fraction", ("aligned_fraction",)),
    ("seconds per step", ("sample_s", "teacher_s", "train_s", "step_s")),
)


def series(metrics: list[dict[str, Any]], name: str) -> tuple[list[int], list[float]]:
    """The steps where `name` was measured and its values there."""
    points = [(m["step"], float(m[name])) for m in metrics if m.get(name) is not None]
    return [p[0] for p in points], [p[1] for p in points]


def plot_metrics(metrics: list[dict[str, Any]], path: Path) -> Path | None:
    """Draw the run's curves to `path` (None when there is nothing to draw)."""
    if not metrics:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(14, 7), constrained_layout=True)
    for ax, (title, names) in zip(axes.flat, PANELS):
        for name in names:
            steps, values = series(metrics, name)
            if steps:
                ax.plot(steps, values, marker="o" if len(steps) < 30 else None, markersize=3, label=name)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if len(names) > 1:
            ax.legend(fontsize=8)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
