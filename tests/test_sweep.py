"""A 2x2 sweep on the embedded demo writes the results table and the plot."""

import csv

import pytest
import yaml

from vocalign.launch.sweep import grid_runs, run_name, run_sweep, summary_row

from .conftest import REPO

pytestmark = pytest.mark.slow


def test_grid_and_summary_by_hand():
    runs = grid_runs({"trainer.reward_weights.sim": [0.0, 0.1], "trainer.resample.enabled": [True, False]})
    assert len(runs) == 4 and run_name(runs[1]) == "reward_weights.sim=0.0,resample.enabled=False"
    metrics = [{"step": 0, "reward/mean": 1.0, "rewards/cer/mean": 0.2},
               {"step": 1, "reward/mean": 2.0, "rewards/cer/mean": 0.4},
               {"step": 2, "reward/mean": 4.0, "rewards/cer/mean": 0.6}]
    row = summary_row("r", runs[0], metrics, last=2)
    assert row == {"run": "r", "reward_weights.sim": 0.0, "resample.enabled": True, "reward": 3.0,
                   "cer": pytest.approx(0.5)}
    with pytest.raises(ValueError, match="non-empty lists"):
        grid_runs({"trainer.beta": []})


def test_demo_2x2_sweep_writes_table_and_plot(tmp_path):
    spec = yaml.safe_load((REPO / "configs" / "sweeps" / "demo_2x2.yaml").read_text())
    spec["base"] = str(REPO / "configs" / "grpo_demo_cpu.yaml")
    spec["output_dir"] = str(tmp_path / "sweep")
    spec["overrides"] = ["trainer.max_steps=1", "env.flow_steps=1", "trainer.max_completion_length=20",
                         "trainer.report_to=none"]
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(spec))
    out = run_sweep(path)
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert len(rows) == 4
    assert {r["reward_weights.sim"] for r in rows} == {"0.0", "0.1"} and {"cer", "sim", "energy"} <= set(rows[0])
    assert (out / "results.md").read_text().count("\n") == 6 and (out / "reward_curves.png").stat().st_size > 0
