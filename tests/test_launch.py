"""Whole runs as users start them: killed and resumed, under DeepSpeed ZeRO-2, and with two processes."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from .conftest import REPO, VENV_BIN

pytestmark = pytest.mark.slow


def cli(output_dir, *extra, steps=12, save_steps=3):
    return [sys.executable, "-m", "vocalign.launch.cli", "train", "configs/grpo_toy.yaml",
            "--set", f"trainer.output_dir={output_dir}", "--set", f"trainer.max_steps={steps}",
            "--set", f"trainer.save_steps={save_steps}", "--set", "trainer.report_to=none",
            "--set", "trainer.save_total_limit=null", *extra]


def run(cmd, **kwargs):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600, **kwargs)


def final_weights(output_dir):
    return load_file(str(output_dir / "final" / "model.safetensors"))


def test_killed_run_resumes_to_the_same_parameters(tmp_path):
    straight = tmp_path / "straight"
    assert run(cli(straight)).returncode == 0

    resumed = tmp_path / "resumed"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cli(resumed, "--set", "trainer.save_steps=6"), cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not (resumed / "checkpoint-6" / "trainer_state.json").exists():
        assert proc.poll() is None and time.monotonic() < deadline, "run ended before its first checkpoint"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (resumed / "final").exists(), "the run finished before it could be killed"

    second = run(cli(resumed, "--set", "trainer.save_steps=6"))
    assert second.returncode == 0, second.stderr[-2000:]
    assert "resumed from" in second.stderr and "checkpoint-6" in second.stderr
    a, b = final_weights(straight), final_weights(resumed)
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=1e-6, rtol=1e-5, msg=name)
    lines = (resumed / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 12  # steps redone after the kill are logged once


@pytest.mark.parametrize("stage", ["zero2", "zero3"])
def test_accelerate_launch_with_deepspeed_and_resume(tmp_path, stage):
    accelerate = str(VENV_BIN / "accelerate")
    base = [accelerate, "launch", "--config_file", f"launch/accelerate_cpu_{stage}.yaml"]
    # beta > 0: the frozen reference model gets its own DeepSpeed engine
    first = run(base + cli(tmp_path, "--set", "trainer.beta=0.1", steps=4, save_steps=2)[1:])
    assert first.returncode == 0, first.stderr[-3000:]
    assert "DEEPSPEED" in first.stderr
    assert (tmp_path / "checkpoint-4" / "pytorch_model").is_dir()  # DeepSpeed's own checkpoint layout
    again = run(base + cli(tmp_path, "--set", "trainer.beta=0.1", steps=6, save_steps=2)[1:])
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resumed from" in again.stderr
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 6 and json.loads(lines[-1])["kl"] > 0


def test_two_cpu_processes(tmp_path):
    torchrun = str(VENV_BIN / "torchrun")
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([torchrun, "--nproc_per_node", "2", "--master_port", "29517"] + cli(tmp_path, steps=3)[1:],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 process(es), MULTI_CPU" in result.stderr
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 3
    assert (tmp_path / "final" / "model.safetensors").is_file()
