"""Sampling under ZeRO-3 must step every process in lockstep: one that finishes early keeps forwarding."""

import json
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from vocalign.policies.sampling import sample
from vocalign.rlhf.toy_env import ToyConfig, build_toy_model

pytestmark = pytest.mark.slow


class CountingDouble(torch.nn.Module):
    """Test double: the toy LM, counting its forward calls (each is a collective under ZeRO-3)."""

    def __init__(self, model):
        super().__init__()
        self.inner, self.config, self.calls = model, model.config, 0

    def forward(self, **kwargs):
        self.calls += 1
        return self.inner(**kwargs)


def _worker(rank, port, out_dir):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    torch.manual_seed(rank)
    model = CountingDouble(build_toy_model(ToyConfig()).eval())
    ids = torch.tensor([[5, 6, 7]])
    out = sample(model, ids, torch.ones_like(ids), max_new_tokens=3 if rank == 0 else 9, stop_token_id=None,
                 pad_token_id=0, synced_processes=True)
    with open(f"{out_dir}/rank{rank}.json", "w") as f:
        json.dump({"calls": model.calls, "length": int(out.mask.sum())}, f)
    dist.destroy_process_group()


def test_processes_finishing_early_keep_stepping(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_worker, args=(port, str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert (r0["length"], r1["length"]) == (3, 9)
    assert r0["calls"] == r1["calls"] == 9  # prompt pass + 8 steps, on both ranks
