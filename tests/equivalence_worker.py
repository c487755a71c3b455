"""One process of a GRPO run on a fixed batch, for tests/test_process_equivalence.py: the same global batch trained by
one process or split over two (DDP, DeepSpeed ZeRO-2, ZeRO-3) must give the same advantages, loss, gradient norm and
weights, with sequence-level or token-level credit. Usage: ``equivalence_worker.py OUT_DIR [--deepspeed CONFIG.json]
[--token-credit]``; writes OUT_DIR/rank<N>.json and, on the main process, OUT_DIR/final/.

Prompts per process are the global batch over the process count, so every launch trains the same global batch.
The Accelerator is made here only because CPU processes need the gloo backend under DeepSpeed.
"""

import argparse
import json
import os

import torch
from accelerate import Accelerator
from accelerate.utils import DeepSpeedPlugin, InitProcessGroupKwargs

from vocalign.rlhf.config import GRPOConfig
from vocalign.rlhf.loss import completion_logps
from vocalign.rlhf.resampling import ResampleConfig
from vocalign.rlhf.rollout import Rollouts
from vocalign.rlhf.toy_env import ToyConfig, ToyEnv, ToyScorer, build_toy_model, toy_prompts
from vocalign.rlhf.trainer import GRPOTrainer
from vocalign.rlhf.training_setup import accumulation_steps

GLOBAL_PROMPTS, GENERATIONS, MAX_LENGTH = 4, 4, 12


class ReplayEnvDouble(ToyEnv):
    """Test double for a sampler: generation ``g`` of a prompt is always the same completion, of its own length
    (2 to 12 tokens, most ending in the stop token), whichever process draws it and however the batch is split. The
    old log-probs are the policy's own, as a sampler's would be, so the first ratio is 1. Spans map to tokens as
    in the toy environment."""

    def __init__(self, toy: ToyConfig) -> None:
        super().__init__(toy)
        self.toy = toy

    def completion(self, prompt: dict, g: int) -> list[int]:
        gen = torch.Generator().manual_seed(1000 * prompt["index"] + g)
        length = int(torch.randint(2, MAX_LENGTH + 1, (1,), generator=gen))
        tokens = torch.randint(1, self.toy.vocab_size, (length,), generator=gen).tolist()
        if length < MAX_LENGTH:
            tokens[-1] = self.toy.stop_token_id
        return tokens

    def rollout(self, model, prompts, num_generations, sampling):
        completions = [self.completion(p, g) for p in prompts for g in range(num_generations)]
        width = max(len(c) for c in completions)
        ids = torch.zeros(len(completions), width, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, c in enumerate(completions):
            ids[i, :len(c)], mask[i, :len(c)] = torch.tensor(c), 1
        prompt_ids = torch.tensor([p["prompt_ids"] for p in prompts]).repeat_interleave(num_generations, 0)
        prompt_mask = torch.ones_like(prompt_ids)
        device = next(model.parameters()).device
        with torch.no_grad():
            logps = completion_logps(model, torch.cat([prompt_ids, ids], 1).to(device),
                                     torch.cat([prompt_mask, mask], 1).to(device), width, sampling.temperature)
        return Rollouts(prompt_ids, prompt_mask, ids, mask, logps.cpu() * mask, num_generations)


class RecordingTrainer(GRPOTrainer):
    """The trainer, recording each step's prompts and the advantages it trains this process's samples on."""

    def train_step(self, prompts, hp):
        self.record.append({"prompts": [p["index"] for p in prompts]})
        return super().train_step(prompts, hp)

    def optimise(self, rollouts, advantages, scored, hp):
        if advantages.dim() == 1:
            self.record[-1]["advantages"] = advantages.tolist()
        else:  # per token: each row's own tokens, whatever width this process's batch was padded to
            lengths = rollouts.completion_mask.sum(-1).tolist()
            self.record[-1]["advantages"] = [row[:n] for row, n in zip(advantages.tolist(), lengths)]
        return super().optimise(rollouts, advantages, scored, hp)


def main(out_dir: str, deepspeed_config: str | None, token_credit: bool) -> None:
    world = int(os.environ.get("WORLD_SIZE", "1"))  # set by torchrun and accelerate launch
    config = GRPOConfig(
        output_dir=out_dir, max_steps=2, prompts_per_step=GLOBAL_PROMPTS // world, num_generations=GENERATIONS,
        micro_batch_size=4, num_iterations=2, learning_rate=1e-2, beta=0.04, max_grad_norm=1e3,
        max_completion_length=MAX_LENGTH, temperature=0.9, report_to="none", save_steps=1000,
        resample=ResampleConfig(enabled=False), reward_weights={"hits": 1.0, "sim": 0.5},
        token_reward_weights={"hits": 0.5} if token_credit else {})
    plugin = DeepSpeedPlugin(hf_ds_config=deepspeed_config) if deepspeed_config else None
    handlers = [InitProcessGroupKwargs(backend="gloo")] if world > 1 else []
    accelerator = Accelerator(cpu=plugin is None, kwargs_handlers=handlers, deepspeed_plugin=plugin,
                              gradient_accumulation_steps=accumulation_steps(config))
    assert accelerator.num_processes == world
    toy = ToyConfig()
    prompts = [{**p, "index": i} for i, p in enumerate(toy_prompts(toy))]
    trainer = RecordingTrainer(build_toy_model(toy), ReplayEnvDouble(toy), ToyScorer(toy), prompts, config,
                               accelerator=accelerator)
    trainer.record = []
    history = trainer.train()
    with open(f"{out_dir}/rank{accelerator.process_index}.json", "w") as f:
        json.dump({"processes": world, "steps": trainer.record, "metrics": history}, f)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("out_dir")
    parser.add_argument("--deepspeed")
    parser.add_argument("--token-credit", action="store_true")
    args = parser.parse_args()
    main(args.out_dir, args.deepspeed, args.token_credit)
