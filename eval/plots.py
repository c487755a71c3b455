"""Reward curves from a run's ``metrics.jsonl``."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def read_metrics(path: str | Path) -> list[dict[str, float]]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def plot_reward_curves(runs: dict[str, Sequence[dict[str, float]]], out_png: str | Path) -> Path:
    """One panel per reward (``rewards/NAME/mean``) plus the fused reward, a line per run."""
    keys = sorted({k for rows in runs.values() for row in rows for k in row
                   if k.startswith("rewards/") and k.endswith("/mean")})
    keys = ["reward/mean"] + keys
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.2), squeeze=False)
    for ax, key in zip(axes[0], keys):
        for label, rows in runs.items():
            points = [(row["step"], row[key]) for row in rows if key in row]
            if points:
                ax.plot(*zip(*points), label=label)
        ax.set_title(key.removesuffix("/mean").removeprefix("rewards/"))
        ax.set_xlabel("step")
    axes[0][0].legend(fontsize="small")
    fig.tight_layout()
    out_png = Path(out_png)
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
    return out_png
