"""Sweeps: grids and named variants; the demo ablation writes the table (with held-out metrics) and the plot."""

import csv

import pytest
import yaml

from vocalign.common.settings import from_dict
from vocalign.launch.sweep import SweepSpec, grid_runs, run_name, run_sweep, seed_table, summary_row, sweep_runs, sweep_seeds

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
    heldout = {"sft": {"error_rate": 0.5, "sim": 0.6, "utterances": 8},  # as compare() writes eval.json
               "grpo": {"error_rate": 0.3, "sim": 0.61, "utterances": 8},
               "relative_change": {"error_rate": -0.4}, "sim_change": 0.01}
    row = summary_row("r", {}, metrics, last=1, heldout=heldout)
    assert {k: v for k, v in row.items() if k.startswith("heldout")} == {
        "heldout sft error_rate": 0.5, "heldout sft sim": 0.6, "heldout grpo error_rate": 0.3, "heldout grpo sim": 0.61}
    # the policies are those the evaluation compared, whatever they are called
    renamed = {"base": heldout["sft"], "tuned": heldout["grpo"], "relative_change": {"error_rate": -0.4}}
    row = summary_row("r", {}, metrics, last=1, heldout=renamed)
    assert row["heldout base error_rate"] == 0.5 and row["heldout tuned sim"] == 0.61


def test_variants_are_named_runs():
    runs = sweep_runs(SweepSpec("r.yaml", variants={"full": {}, "no_resampling": {"trainer.resample.enabled": False}}))
    assert runs == [("full", {}), ("no_resampling", {"trainer.resample.enabled": False})]
    with pytest.raises(ValueError, match="either `grid`"):
        sweep_runs(SweepSpec("r.yaml", grid={"trainer.beta": [0.0]}, variants={"a": {}}))
    with pytest.raises(ValueError, match="map run names to mappings"):
        sweep_runs(SweepSpec("r.yaml", variants={"a": ["trainer.beta=0"]}))


def test_a_sweep_file_key_that_no_sweep_reads_is_refused():
    with pytest.raises(ValueError, match=r"unknown key\(s\) in sweep file s.yaml: 'seed' \(did you mean 'seeds'\?\)"):
        from_dict(SweepSpec, {"base": "r.yaml", "grid": {"trainer.beta": [0.0]}, "seed": [0]}, "sweep file s.yaml")
    with pytest.raises(ValueError, match=r"sweep file s.yaml.summary_steps must be an integer, got 'five'"):
        from_dict(SweepSpec, {"base": "r.yaml", "summary_steps": "five"}, "sweep file s.yaml")


def test_seeds_repeat_each_run_and_the_table_shows_their_spread():
    assert sweep_seeds(SweepSpec("r.yaml")) == [None] and sweep_seeds(SweepSpec("r.yaml", seeds=[0, 1])) == [0, 1]
    for bad in ([], [0, 0], ["0"], 1, [True]):
        with pytest.raises(ValueError, match="list of distinct integer training seeds"):
            sweep_seeds(SweepSpec("r.yaml", seeds=bad))
    rows = [{"run": "a", "seed": 0, "trainer.beta": 0.1, "cer": 0.5, "heldout grpo error_rate": 0.25},
            {"run": "a", "seed": 1, "trainer.beta": 0.1, "cer": 0.7, "heldout grpo error_rate": 0.35},
            {"run": "b", "seed": 0, "trainer.beta": 0.0, "cer": 0.4}]
    assert seed_table(rows, {"trainer.beta"}) == [
        {"run": "a", "seeds": "0, 1", "trainer.beta": 0.1, "cer": "0.6000 [0.5000, 0.7000]",
         "heldout grpo error_rate": "0.3000 [0.2500, 0.3500]"},
        {"run": "b", "seeds": "0", "trainer.beta": 0.0, "cer": 0.4}]


def test_demo_ablation_writes_table_with_heldout_metrics_and_plot(tmp_path):
    spec = yaml.safe_load((REPO / "configs" / "sweeps" / "demo_ablation.yaml").read_text())
    spec["base"] = str(REPO / "configs" / "grpo_demo_cpu.yaml")
    spec["output_dir"] = str(tmp_path / "sweep")
    spec["overrides"] = ["trainer.max_steps=1", "trainer.prompts_per_step=2", "trainer.num_generations=2",
                         "trainer.report_to=none", "eval.seeds=[0]", "eval.limit=2"]
    spec["seeds"] = [3]  # one training seed: each run in its seed folder
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))  # variants run in the order written
    out = run_sweep(path)
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert [r["run"] for r in rows] == ["full", "sum_then_normalize", "no_resampling", "fixed_clip", "token_credit"]
    assert {r["seed"] for r in rows} == {"3"} and (out / "full" / "seed3" / "final").is_dir()
    assert {"cer", "sim", "heldout sft error_rate", "heldout grpo error_rate"} <= set(rows[0])
    assert (out / "results.md").read_text().count("\n") == 7 and (out / "reward_curves.png").stat().st_size > 0
