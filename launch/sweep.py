"""Reward-ablation sweeps: run a set of recipe variants and tabulate the results like the report's tables.

A sweep file names a base recipe, ``overrides`` applied to every run (``section.key=value`` items, read by the same
parser as ``vocalign train --set``), and either a ``grid`` of ``section.key: [values]`` (every combination runs) or
named ``variants`` of ``section.key: value`` (an ablation list: each runs as written), and optionally ``seeds``:
training seeds (``trainer.seed``) each run is repeated with, so that a difference between runs can be read against
the spread between seeds.
Every run is its own ``vocalign train`` process (so each has a clean accelerate state and can be killed and resumed
on its own: a finished run is not run again). ``results.csv`` has one row per run and seed: its settings, the mean
of each reward over the last ``summary_steps`` steps and, when the recipe has an ``eval`` section, the held-out
metrics of each policy it compared (from the run's ``eval.json``: the columns of the plugins' ``error_rate`` and
``similarity`` roles, whatever the plugins and policies are called); ``results.md`` has one row per run,
each figure as its mean over the seeds with every seed's value; a PNG overlays every run's reward curves.
"""

from __future__ import annotations

import csv
import itertools
import json
import logging
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..common.settings import format_override, from_dict, load_yaml, parse_override
from ..eval.heldout import ROLE_COLUMNS, policy_summaries, seed_cell
from ..eval.plots import plot_reward_curves, read_metrics

logger = logging.getLogger(__name__)


@dataclass
class SweepSpec:
    """A sweep file, read by ``from_dict`` like every config section: a misspelt key fails before any run."""

    base: str  # the recipe every run starts from, relative to the sweep file
    output_dir: str | None = None  # where the runs and tables go; default runs/sweep_<file stem>
    overrides: list[str] = field(default_factory=list)  # `section.key=value` items applied to every run
    grid: dict[str, list[Any]] | None = None  # `section.key: [values]`: every combination runs
    variants: dict[str, dict[str, Any]] | None = None  # run name -> `section.key: value`: each runs as written
    seeds: list[int] | None = None  # training seeds each run is repeated with; none: the recipe's own seed
    summary_steps: int = 5  # the table's reward figures are means over this many last steps


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
    for policy, summary in policy_summaries(heldout or {}).items():
        for metric in ROLE_COLUMNS.values():
            if metric in summary:
                row[f"heldout {policy} {metric}"] = summary[metric]
    return row


def seed_table(rows: list[dict[str, Any]], settings: set[str]) -> list[dict[str, Any]]:
    """One row per run from its rows of several seeds: each figure as ``mean [seed, seed, ...]``, settings as is."""
    by_run: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        by_run.setdefault(row["run"], []).append(row)
    table = []
    for group in by_run.values():
        merged: dict[str, Any] = {}
        for key in dict.fromkeys(k for r in group for k in r):
            values = [r.get(key) for r in group]
            if key == "seed":
                merged["seeds"] = ", ".join(str(v) for v in values)
            elif key not in settings and len(group) > 1 and all(isinstance(v, float) for v in values):
                merged[key] = seed_cell(sum(values) / len(values), values)
            else:
                merged[key] = values[0]
        table.append(merged)
    return table


def write_table(rows: list[dict[str, Any]], out: Path, settings: set[str]) -> None:
    columns = list(dict.fromkeys(k for r in rows for k in r))
    with (out / "results.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, columns)
        writer.writeheader()
        writer.writerows(rows)

    def fmt(v: Any) -> str:
        return f"{v:.4f}" if isinstance(v, float) else str(v)

    table = seed_table(rows, settings)
    columns = list(dict.fromkeys(k for r in table for k in r))
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |" for r in table]
    (out / "results.md").write_text("\n".join(lines) + "\n")


def sweep_seeds(spec: SweepSpec) -> list[int | None]:
    """The training seeds each run is repeated with; ``[None]`` (the recipe's own seed) when the sweep names none."""
    seeds = spec.seeds
    if seeds is None:
        return [None]
    if not isinstance(seeds, list) or not seeds or not all(type(s) is int for s in seeds) or len(set(seeds)) < len(seeds):
        raise ValueError(f"sweep `seeds` must be a list of distinct integer training seeds, e.g. `seeds: [0, 1]`; "
                         f"got {seeds!r}")
    return seeds


def sweep_runs(spec: SweepSpec) -> list[tuple[str, dict[str, Any]]]:
    """(name, overrides) of each run: the grid's combinations, or the named variants."""
    if (spec.grid is None) == (spec.variants is None):
        raise ValueError("a sweep has either `grid` (every combination) or `variants` (named runs), not both")
    if spec.grid is not None:
        return [(run_name(values), values) for values in grid_runs(spec.grid)]
    variants = spec.variants
    if not isinstance(variants, dict) or not variants or not all(isinstance(v, dict) for v in variants.values()):
        raise ValueError("sweep `variants` must map run names to mappings of dotted keys to values")
    return [(str(name), dict(values)) for name, values in variants.items()]


def run_sweep(path: str | Path) -> Path:
    path = Path(path)
    data = load_yaml(path)
    spec = from_dict(SweepSpec, data, f"sweep file {path}")
    runs = sweep_runs(spec)
    seeds = sweep_seeds(spec)
    fixed = [parse_override(item) for item in spec.overrides]  # a malformed one fails before any run
    base = (path.parent / spec.base).resolve()
    out = Path(spec.output_dir or f"runs/sweep_{path.stem}")
    out.mkdir(parents=True, exist_ok=True)
    (out / "sweep.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    rows, curves = [], {}
    for (name, values), seed in itertools.product(runs, seeds):
        run_dir = out / re.sub(r"[^A-Za-z0-9_-]+", "_", name.replace("=", "_").replace(",", "__").replace(".", "-"))
        label, extra = name, [("trainer.run_name", name)]
        if seed is not None:
            run_dir, label = run_dir / f"seed{seed}", f"{name} seed={seed}"
            extra = [("trainer.seed", seed), ("trainer.run_name", label)]
        if not (run_dir / "final").is_dir():
            cmd = [sys.executable, "-m", "vocalign.launch.cli", "train", str(base)]
            for key, value in [*fixed, *values.items(), *extra, ("trainer.output_dir", str(run_dir))]:
                cmd += ["--set", format_override(key, value)]
            logger.info("sweep run %s", label)
            subprocess.run(cmd, check=True)
        metrics = read_metrics(run_dir / "metrics.jsonl")
        curves[label] = metrics
        heldout = json.loads((run_dir / "eval.json").read_text()) if (run_dir / "eval.json").is_file() else None
        row = summary_row(name, values, metrics, spec.summary_steps, heldout)
        rows.append(row if seed is None else {"run": name, "seed": seed, **row})
    write_table(rows, out, {_short(key) for _, values in runs for key in values})
    plot_reward_curves(curves, out / "reward_curves.png")
    return out
