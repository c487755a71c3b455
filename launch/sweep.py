"""Reward-ablation sweeps: run a set of recipe variants and tabulate the results like the report's tables.

A sweep file names a base recipe, ``overrides`` applied to every run (``section.key=value`` items, read by the same
parser as ``vocalign train --set``), and either a ``grid`` of ``section.key: [values]`` (every combination runs) or
named ``variants`` of ``section.key: value`` (an ablation list: each runs as written).
Every run is its own ``vocalign train`` process (so each has a clean accelerate state and can be killed and resumed
on its own: a finished run is not run again). The table has one row per run: its settings, the mean of each reward
over the last ``summary_steps`` steps and, when the recipe has an ``eval`` section, the held-out metrics of the
starting and the trained policy (from the run's ``eval.json``); a PNG overlays every run's reward curves.
"""

from __future__ import annotations

import csv
import itertools
import json
import logging
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from vocalign.eval.plots import plot_reward_curves, read_metrics
from vocalign.rlhf.config import format_override, load_yaml, parse_override

logger = logging.getLogger(__name__)


def grid_runs(grid: dict[str, list[Any]]) -> list[dict[str, Any]]:
    if not grid or not all(isinstance(v, list) and v for v in grid.values()):
        raise ValueError("sweep `grid` must map dotted keys to non-empty lists of values")
    keys = list(grid)
    return [dict(zip(keys, combo)) for combo in itertools.product(*(grid[k] for k in keys))]


def _short(key: str) -> str:
    """``trainer.reward_weights.sim`` -> ``reward_weights.sim``: unique, and never a reward's own column name."""
    return key.split(".", 1)[1] if key.startswith(("trainer.", "env.")) else key


def run_name(values: dict[str, Any]) -> str:
    return ",".join(f"{_short(key)}={value}" for key, value in values.items())


def summary_row(name: str, values: dict[str, Any], metrics: list[dict[str, float]], last: int,
                heldout: dict[str, Any] | None = None) -> dict[str, Any]:
    tail = metrics[-last:]
    keys = sorted({k for m in tail for k in m if k.startswith("rewards/") and k.endswith("/mean")})
    row: dict[str, Any] = {"run": name, **{_short(k): v for k, v in values.items()}}
    for key in ["reward/mean", *keys]:
        points = [m[key] for m in tail if key in m]
        row[key.removeprefix("rewards/").removesuffix("/mean")] = sum(points) / len(points) if points else None
    for policy in ("sft", "grpo"):
        for metric in ("error_rate", "sim"):
            if heldout and metric in heldout.get(policy, {}):
                row[f"heldout {policy} {metric}"] = heldout[policy][metric]
    return row


def write_table(rows: list[dict[str, Any]], out: Path) -> None:
    columns = list(dict.fromkeys(k for r in rows for k in r))
    with (out / "results.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, columns)
        writer.writeheader()
        writer.writerows(rows)
    def fmt(v: Any) -> str:
        return f"{v:.4f}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
    (out / "results.md").write_text("\n".join(lines) + "\n")


def sweep_runs(spec: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(name, overrides) of each run: the grid's combinations, or the named variants."""
    if ("grid" in spec) == ("variants" in spec):
        raise ValueError("a sweep has either `grid` (every combination) or `variants` (named runs), not both")
    if "grid" in spec:
        return [(run_name(values), values) for values in grid_runs(spec["grid"] or {})]
    variants = spec["variants"]
    if not isinstance(variants, dict) or not variants or not all(isinstance(v, dict) for v in variants.values()):
        raise ValueError("sweep `variants` must map run names to mappings of dotted keys to values")
    return [(str(name), dict(values)) for name, values in variants.items()]


def run_sweep(path: str | Path) -> Path:
    path = Path(path)
    spec = load_yaml(path)
    unknown = sorted(set(spec) - {"base", "output_dir", "overrides", "grid", "variants", "summary_steps"})
    if unknown:
        raise ValueError(f"{path}: unknown sweep keys {unknown}")
    runs = sweep_runs(spec)
    fixed = [parse_override(item) for item in spec.get("overrides", [])]  # a malformed one fails before any run
    base = (path.parent / spec["base"]).resolve()
    out = Path(spec.get("output_dir", f"runs/sweep_{path.stem}"))
    out.mkdir(parents=True, exist_ok=True)
    (out / "sweep.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    rows, curves = [], {}
    for name, values in runs:
        run_dir = out / re.sub(r"[^A-Za-z0-9_-]+", "_", name.replace("=", "_").replace(",", "__").replace(".", "-"))
        if not (run_dir / "final").is_dir():
            cmd = [sys.executable, "-m", "vocalign.launch.cli", "train", str(base)]
            for key, value in [*fixed, *values.items(), ("trainer.output_dir", str(run_dir)), ("trainer.run_name", name)]:
                cmd += ["--set", format_override(key, value)]
            logger.info("sweep run %s", name)
            subprocess.run(cmd, check=True)
        metrics = read_metrics(run_dir / "metrics.jsonl")
        curves[name] = metrics
        heldout = json.loads((run_dir / "eval.json").read_text()) if (run_dir / "eval.json").is_file() else None
        rows.append(summary_row(name, values, metrics, int(spec.get("summary_steps", 5)), heldout))
    write_table(rows, out)
    plot_reward_curves(curves, out / "reward_curves.png")
    return out
