"""bench/rollout_gpu.py without CUDA: every part runs at --tiny sizes on CPU and says the GPU figures were not taken."""

import importlib.util
import sys
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parents[1] / "bench" / "rollout_gpu.py"


def load_bench(monkeypatch):
    spec = importlib.util.spec_from_file_location("rollout_gpu", BENCH)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "rollout_gpu", module)  # its dataclass looks its module up while defined
    spec.loader.exec_module(module)
    return module


def test_rollout_gpu_bench_runs_tiny_on_cpu(monkeypatch, capsys):
    bench = load_bench(monkeypatch)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the CPU path, also on a GPU machine
    threads = torch.get_num_threads()  # the CPU path runs on one thread
    try:
        bench.main(["--tiny"])
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    lines = out.splitlines()
    no_cuda = [i for i, line in enumerate(lines) if line.startswith("no CUDA: GPU figures not taken")]
    assert no_cuda and no_cuda[0] < next(i for i, line in enumerate(lines) if line.startswith("device:")), out
    assert any(line.strip().startswith("HF generate") and "tokens/s" in line for line in lines), out
    assert any(line.strip().startswith("eager (vocalign, dynamic cache)") and "tokens/s" in line for line in lines), out
    assert "graphed decode: needs CUDA (skipped)" in out
    assert "token-to-audio" in out and "rewards: Whisper" in out and "full fine-tune" in out and "LoRA r=16" in out
    assert "one GRPO step, by phase" in out
    assert "out of memory" not in out
