"""Sampling under ZeRO-3 must step every process in lockstep: one that finishes early keeps forwarding; the trainer
switches it on under ZeRO-3 with several processes and the environments hand it to the sampler."""

import json
import os
import socket
import subprocess
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from accelerate.utils import DistributedType

from vocalign.common.audio import write_audio
from vocalign.policies.sampling import sample
from vocalign.rlhf.rollout import SamplingParams
from vocalign.rlhf.toy_env import ToyConfig, ToyEnv, build_toy_model, toy_prompts
from vocalign.rlhf.training_setup import generation_is_collective

from .conftest import REPO, VENV_BIN

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


def test_grpo_under_zero3_with_two_processes_samples_in_lockstep(tmp_path):
    """The trainer turns synced sampling on under ZeRO-3 with several processes: in every rollout both processes
    make as many forward passes as the one with the longest completion needs."""
    config = tmp_path / "accelerate.yaml"
    config.write_text("compute_environment: LOCAL_MACHINE\ndistributed_type: DEEPSPEED\n"
                      "deepspeed_config: {deepspeed_config_file: launch/zero3.json, zero3_init_flag: false}\n"
                      "num_machines: 1\nnum_processes: 2\nmachine_rank: 0\nuse_cpu: false\n")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [str(VENV_BIN / "accelerate"), "launch", "--config_file", str(config), "--main_process_port", str(port),
           str(REPO / "tests" / "zero3_worker.py"), str(tmp_path)]
    result = subprocess.run(cmd, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["processes"] == 2 and len(r0["rollouts"]) == len(r1["rollouts"]) >= 3
    for a, b in zip(r0["rollouts"], r1["rollouts"]):
        assert a["forwards"] == b["forwards"] == max(a["longest"], b["longest"]), (a, b)
        assert a["synced"] and b["synced"]
    assert {a["longest"] for a in r0["rollouts"]} != {b["longest"] for b in r1["rollouts"]}  # they did differ


def test_generation_is_synced_only_under_zero3_with_several_processes():
    def accelerator(kind, stage, processes):
        plugin = SimpleNamespace(zero_stage=stage)
        return SimpleNamespace(distributed_type=kind, state=SimpleNamespace(deepspeed_plugin=plugin),
                               num_processes=processes)

    assert generation_is_collective(accelerator(DistributedType.DEEPSPEED, 3, 2))
    assert not generation_is_collective(accelerator(DistributedType.DEEPSPEED, 3, 1))
    assert not generation_is_collective(accelerator(DistributedType.DEEPSPEED, 2, 8))
    assert not generation_is_collective(accelerator(DistributedType.MULTI_CPU, None, 2))


def test_environments_hand_the_sync_flag_to_the_sampler(monkeypatch, tmp_path):
    """Toy and GLM-TTS environments pass SamplingParams (the sync flag among them) on to the sampler."""
    import vocalign.policies.speech_lm as speech_lm
    import vocalign.rlhf.toy_env as toy_env
    from vocalign.policies.checkpoints import write_tiny_checkpoint
    from vocalign.policies.pipeline import TTSPipeline
    from vocalign.rlhf.tts_env import TTSEnv

    seen = []

    def recording(real):
        def sample_and_record(*args, **kwargs):
            seen.append((kwargs["synced_processes"], kwargs["top_k"], kwargs["top_p"], kwargs["temperature"]))
            return real(*args, **kwargs)
        return sample_and_record

    monkeypatch.setattr(toy_env, "sample", recording(sample))
    monkeypatch.setattr(speech_lm, "sample", recording(sample))
    toy = ToyConfig()
    synced = SamplingParams(temperature=0.9, top_k=7, top_p=0.5, max_new_tokens=4, synced_processes=True)
    ToyEnv(toy).rollout(build_toy_model(toy), toy_prompts(toy)[:1], 2, synced)
    pipeline = TTSPipeline.from_pretrained(write_tiny_checkpoint(tmp_path / "ckpt"))
    prompt_wav = tmp_path / "prompt.wav"
    write_audio(prompt_wav, np.sin(np.arange(16000) / 10).astype(np.float32) * 0.1, 16000)
    row = {"text": "hello", "language": "en", "prompt_wav": str(prompt_wav), "prompt_text": "hi"}
    env = TTSEnv(pipeline)
    env.rollout(pipeline.lm.model, [row], 2, synced)
    env.rollout(pipeline.lm.model, [row], 2, SamplingParams(max_new_tokens=4))
    assert seen == [(True, 7, 0.5, 0.9)] * 2 + [(False, None, None, 1.0)]


def test_the_toy_environment_asks_for_a_length_bound():
    toy = ToyConfig()
    with pytest.raises(ValueError, match="max_new_tokens"):
        ToyEnv(toy).rollout(build_toy_model(toy), toy_prompts(toy)[:1], 2, SamplingParams())
