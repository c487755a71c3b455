"""Reward curves from a run's ``metrics.jsonl``, with the held-out curve when the run evaluated during training."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

HELDOUT_METRICS = ("eval/error_rate", "eval/sim")  # written every eval.every_steps steps (eval/heldout.py)


def read_metrics(path: str | Path) -> list[dict[str, float]]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def curve_panels(runs: dict[str, Sequence[dict[str, float]]]) -> dict[str, dict[str, list[tuple[int, float]]]]:
    """Each panel's points per run: the fused reward and each reward's mean against the step whose samples they
    score, then each held-out metric the metrics hold against the number of steps the scored policy had taken
    (a step's row holds the evaluation after its update, hence step + 1)."""
    logged = {k for rows in runs.values() for row in rows for k in row}
    rewards = ["reward/mean"] + sorted(k for k in logged if k.startswith("rewards/") and k.endswith("/mean"))
    panels = {key.removesuffix("/mean").removeprefix("rewards/"): {
        label: [(row["step"], row[key]) for row in rows if key in row] for label, rows in runs.items()}
        for key in rewards}
    for key in HELDOUT_METRICS:
        if key in logged:
            panels["held-out " + key.removeprefix("eval/")] = {
                label: [(row["step"] + 1, row[key]) for row in rows if key in row] for label, rows in runs.items()}
    return panels


def plot_reward_curves(runs: dict[str, Sequence[dict[str, float]]], out_png: str | Path) -> Path:
    """One panel per reward (``rewards/NAME/mean``) plus the fused reward, and one per held-out metric the runs
    logged; a line per run."""
    panels = curve_panels(runs)
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.2), squeeze=False)
    for ax, (title, lines) in zip(axes[0], panels.items()):
        for label, points in lines.items():
            if points:
                ax.plot(*zip(*points), label=label, marker="o" if title.startswith("held-out") else None)
        ax.set_title(title)
        ax.set_xlabel("step")
    axes[0][0].legend(fontsize="small")
    fig.tight_layout()
    out_png = Path(out_png)
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
    return out_png
