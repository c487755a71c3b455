"""bench/rollout_gpu.py without CUDA: every part runs at --tiny sizes on CPU; its figures are checked against what
they count (generated tokens, a filled KV cache, the matmuls of a forward), recounted independently."""

import argparse
import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import DynamicCache

from vocalign.policies.decoding import CACHE_ARGUMENT

BENCH = Path(__file__).resolve().parents[1] / "bench" / "rollout_gpu.py"
EAGER = "eager (vocalign, dynamic cache)"


@pytest.fixture
def bench(monkeypatch):
    spec = importlib.util.spec_from_file_location("rollout_gpu", BENCH)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "rollout_gpu", module)  # its dataclass looks its module up while defined
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def tiny_lm(bench):
    sizes = bench.sizes(argparse.Namespace(tiny=True, batches=None, new_tokens=None, micro_batch=None))
    torch.manual_seed(0)
    return sizes, bench.build_lm(sizes.lm, torch.device("cpu"), torch.float32)


def test_rollout_gpu_bench_runs_tiny_on_cpu(bench, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the CPU path, also on a GPU machine
    threads = torch.get_num_threads()  # the CPU path runs on one thread
    try:
        figures = bench.main(["--tiny"])
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    lines = out.splitlines()
    no_cuda = [i for i, line in enumerate(lines) if line.startswith("no CUDA: GPU figures not taken")]
    assert no_cuda and no_cuda[0] < next(i for i, line in enumerate(lines) if line.startswith("device:")), out
    assert "graphed decode: needs CUDA (skipped)" in out and "out of memory" not in out
    runs = figures.decode[4]  # --tiny: batch 4, 8 new tokens per row and no stop token
    assert set(runs) == {"HF generate", EAGER}
    for name, run in runs.items():
        assert run.tokens == 4 * 8, name
        assert f"  {name:47s} {run.tokens / run.seconds:10.1f} tokens/s  ({run.tokens} tokens, {run.seconds:.2f} s)" in lines
    assert f"  ratio eager/HF = {runs[EAGER].rate / runs['HF generate'].rate:.2f}x" in lines
    assert list(figures.phases) == ["rollout", "token-to-audio", "rewards", "update, full", "update, LoRA"]
    assert figures.phases["rollout"] == runs[EAGER].seconds  # on CPU the rollout path is the eager one
    assert all(seconds > 0 for seconds in figures.phases.values())
    assert lines[-1] == "one GRPO step, by phase (rollout at the first batch size): " + ", ".join(
        f"{name} {seconds:.2f} s" for name, seconds in figures.phases.items())


def test_kv_bytes_are_those_a_filled_cache_holds(bench, tiny_lm):
    sizes, model = tiny_lm
    cache = DynamicCache(config=sizes.lm)
    with torch.no_grad():
        model(input_ids=torch.randint(1, sizes.lm.vocab_size, (3, 20)), use_cache=True, **{CACHE_ARGUMENT: cache})
    held = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
    assert bench.kv_cache_bytes(sizes.lm, batch=3, context=20, itemsize=4) == held


def test_update_flops_are_the_forward_matmuls_times_three_or_two(bench, tiny_lm):
    sizes, model = tiny_lm
    rows, width, new = 2, 24, 8
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        # the update's forward: only the completion's logits (and the one before it) go through the LM head
        model(input_ids=torch.randint(1, sizes.lm.vocab_size, (rows, width)), logits_to_keep=new + 1, use_cache=False)
    counts = counter.get_flop_counts()["Global"]
    forward = counts[torch.ops.aten.mm]  # every projection and the LM head (attention is another op: not counted)
    assert bench.update_flops(model, rows, width, new, lora=False) == 3 * forward  # forward, input and weight grads
    assert bench.update_flops(model, rows, width, new, lora=True) == 2 * forward  # no weight gradients
