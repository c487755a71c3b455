"""N processes train what one would: the same global batch trained by one process and split over two (DDP,
DeepSpeed ZeRO-2, ZeRO-3; gloo on CPU) gives the same prompts, advantages, loss, gradient norm, KL, clip fractions
and updated weights.

Each check here exists because a one-line mistake in the multi-process path passed every other test: every process
taking the same prompts, every process training on process 0's advantages, the token normaliser not divided by the
process count (the loss off by the world size), the gradient norm summed over processes instead of averaged.
Tolerance: 1e-5 relative for figures and for each tensor's update (float32 sums taken in another order on
another split of the batch).
"""

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from vocalign.rlhf.toy_env import ToyConfig, build_toy_model

from .conftest import REPO, VENV_BIN

pytestmark = pytest.mark.slow
WORKER = str(REPO / "tests" / "equivalence_worker.py")
RTOL, ATOL = 1e-5, 1e-7
COMPARED_METRICS = ("loss", "grad_norm", "kl", "clip/low_frac", "clip/high_frac", "advantage/std", "reward/mean")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(out_dir, launcher: str, *options: str):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if launcher == "single":
        cmd = [sys.executable, WORKER, str(out_dir), *options]
    elif launcher == "ddp":
        env["ACCELERATE_USE_CPU"] = "1"
        cmd = [str(VENV_BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port()), WORKER,
               str(out_dir), *options]
    else:  # DeepSpeed: gloo needs use_cpu false in the launcher's config (see shared/ENVIRONMENT.md)
        config = out_dir.parent / f"accelerate_{launcher}.yaml"
        config.write_text("compute_environment: LOCAL_MACHINE\ndistributed_type: DEEPSPEED\n"
                          f"deepspeed_config: {{deepspeed_config_file: launch/{launcher}.json, zero3_init_flag: false}}\n"
                          "num_machines: 1\nnum_processes: 2\nmachine_rank: 0\nuse_cpu: false\n")
        cmd = [str(VENV_BIN / "accelerate"), "launch", "--config_file", str(config), "--main_process_port",
               str(free_port()), WORKER, str(out_dir), "--deepspeed", f"launch/{launcher}.json", *options]
    out_dir.mkdir(parents=True)
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    ranks = sorted(out_dir.glob("rank*.json"))
    return [json.loads(p.read_text()) for p in ranks], load_file(str(out_dir / "final" / "model.safetensors"))


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """The one-process runs, sequence-level and token-level credit, made once for every comparison."""
    root = tmp_path_factory.mktemp("equivalence")
    runs = {}

    def run(options: tuple[str, ...]):
        if options not in runs:
            runs[options] = launch(root / f"single{len(runs)}", "single", *options)
        return runs[options]

    return run


def flat(values) -> list[float]:
    """Per-sample advantages, or per-token ones (a list per sample), as one list."""
    return [x for v in values for x in (v if isinstance(v, list) else [v])]


def close(a, b) -> bool:
    a, b = flat(a) if isinstance(a, list) else [a], flat(b) if isinstance(b, list) else [b]
    return len(a) == len(b) and torch.allclose(torch.tensor(a, dtype=torch.float64),
                                               torch.tensor(b, dtype=torch.float64), rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("launcher, options", [("ddp", ()), ("zero2", ()), ("zero3", ()),
                                               ("ddp", ("--token-credit",))])
def test_two_processes_train_what_one_would(single, tmp_path, launcher, options):
    """Per-token advantages included: completions are as wide as each process's longest, yet each token's
    advantage and the update must be the single process's."""
    (one,), one_weights = single(options)
    (r0, r1), weights = launch(tmp_path / launcher, launcher, *options)
    assert one["processes"] == 1 and r0["processes"] == r1["processes"] == 2
    for step, (s, a, b) in enumerate(zip(one["steps"], r0["steps"], r1["steps"], strict=True)):
        # each process its own prompts, together the single run's, in order
        assert not set(a["prompts"]) & set(b["prompts"]), f"step {step}: processes share prompts"
        assert a["prompts"] + b["prompts"] == s["prompts"], f"step {step}"
        # each process trains its own samples on the advantages the whole batch gives them
        assert close(a["advantages"] + b["advantages"], s["advantages"]), (
            f"step {step}: advantages {a['advantages'] + b['advantages']} != {s['advantages']}")
    for step, (s, a, b) in enumerate(zip(one["metrics"], r0["metrics"], r1["metrics"], strict=True)):
        for key in COMPARED_METRICS:
            assert close(a[key], s[key]) and close(b[key], s[key]), (
                f"step {step} {key}: single {s[key]}, processes {a[key]} / {b[key]}")
    # the update each tensor got: the same to 1e-5 of its size (Adam's first steps divide by tiny second moments,
    # so single elements may differ more in relative terms; the update as a whole may not)
    start = build_toy_model(ToyConfig()).state_dict()
    assert weights.keys() == one_weights.keys()
    for name, w in one_weights.items():
        update = (w - start[name]).norm()
        assert update > 0, f"{name} was not trained"
        assert (weights[name] - w).norm() <= RTOL * update, (
            f"{name}: updates differ by {(weights[name] - w).norm() / update:.2e} of their size")
