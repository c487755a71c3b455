"""Reward curves from a run's ``metrics.jsonl``, with the held-out curve when the run evaluated during training."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

HELDOUT_METRICS = ("eval/error_rate", "eval/sim")  # written every eval.every_steps steps (eval/heldout.py)


def read_metrics(path: str | Path) -> list[dict[str, float]]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


Heldout = Mapping[str, Mapping[int, Mapping[str, float]]]  # per run: held-out summaries by steps done


def curve_panels(runs: dict[str, Sequence[dict[str, float]]], heldout: Heldout | None = None
                 ) -> dict[str, dict[str, list[tuple[int, float]]]]:
    """Each panel's points per run: the fused reward and each reward's mean against the step whose samples they
    score, then each held-out metric against the number of steps the scored policy had taken: the evaluations
    during training from the metrics (a step's row holds the evaluation after its update, hence step + 1) and those
    given in ``heldout`` (before and after training, ``eval/heldout.py``'s summaries), which win at the same step."""
    heldout = heldout or {}
    logged = {k for rows in runs.values() for row in rows for k in row}
    rewards = ["reward/mean"] + sorted(k for k in logged if k.startswith("rewards/") and k.endswith("/mean"))
    panels = {key.removesuffix("/mean").removeprefix("rewards/"): {
        label: [(row["step"], row[key]) for row in rows if key in row] for label, rows in runs.items()}
        for key in rewards}
    for key in HELDOUT_METRICS:
        metric = key.removeprefix("eval/")
        lines = {}
        for label, rows in runs.items():
            points = {row["step"] + 1: row[key] for row in rows if key in row}
            points.update({step: summary[metric] for step, summary in heldout.get(label, {}).items()
                           if metric in summary})
            lines[label] = sorted(points.items())
        if any(lines.values()):
            panels["held-out " + metric] = lines
    return panels


def plot_reward_curves(runs: dict[str, Sequence[dict[str, float]]], out_png: str | Path,
                       heldout: Heldout | None = None) -> Path:
    """One panel per reward (``rewards/NAME/mean``) plus the fused reward, and one per held-out metric the runs
    logged or ``heldout`` gives (see :func:`curve_panels`); a line per run."""
    panels = curve_panels(runs, heldout)
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
