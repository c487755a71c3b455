"""One GRPO step of vocalign vs TRL's GRPOTrainer: same tiny Llama, prompts, group size, completion length, reward.

Both sides are measured in this run, on this machine, after one warm-up step each; the ratio is what to read.
Run: .venv/bin/python bench/grpo_step.py [--steps 5] [--hidden 128] [--completion 32]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

os.environ.setdefault("WANDB_MODE", "disabled")

import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from transformers import TrainerCallback  # noqa: E402
from trl import GRPOConfig as TRLConfig  # noqa: E402
from trl import GRPOTrainer as TRLTrainer  # noqa: E402

from vocalign.rlhf.config import GRPOConfig  # noqa: E402
from vocalign.rlhf.resampling import ResampleConfig  # noqa: E402
from vocalign.rlhf.schedules import StepHyperparams  # noqa: E402
from vocalign.rlhf.toy_env import ToyConfig, ToyEnv, ToyScorer, build_toy_model, toy_prompts, toy_tokenizer  # noqa: E402
from vocalign.rlhf.trainer import GRPOTrainer  # noqa: E402


class StepTimer(TrainerCallback):
    def __init__(self) -> None:
        self.times: list[float] = []

    def on_step_begin(self, args, state, control, **kwargs):
        self.start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.times.append(time.perf_counter() - self.start)


def bench_trl(toy: ToyConfig, prompts, args) -> list[float]:
    targets = set(toy.target_tokens)

    def hits(completion_ids, **_):
        return [sum(t in targets for t in ids) / max(len(ids), 1) for ids in completion_ids]

    texts = [" ".join(f"t{i}" for i in p["prompt_ids"]) for p in prompts]
    timer = StepTimer()
    with tempfile.TemporaryDirectory() as out:
        config = TRLConfig(
            output_dir=out, per_device_train_batch_size=args.prompts * args.generations,
            num_generations=args.generations, max_completion_length=args.completion, max_steps=args.steps + 1,
            learning_rate=1e-4, report_to="none", use_cpu=True, bf16=False, logging_steps=1000, save_strategy="no",
            loss_type="dapo", epsilon=0.2, epsilon_high=0.3, beta=0.0, temperature=1.0, seed=0)
        trainer = TRLTrainer(model=build_toy_model(toy), reward_funcs=[hits], args=config,
                             train_dataset=Dataset.from_dict({"prompt": texts}),
                             processing_class=toy_tokenizer(toy.vocab_size), callbacks=[timer])
        trainer.train()
    return timer.times[1:]


def bench_ours(toy: ToyConfig, prompts, args) -> list[float]:
    with tempfile.TemporaryDirectory() as out:
        config = GRPOConfig(
            output_dir=out, max_steps=args.steps + 1, prompts_per_step=args.prompts, num_generations=args.generations,
            micro_batch_size=args.prompts * args.generations, max_completion_length=args.completion,
            learning_rate=1e-4, report_to="none", loss_type="token_mean", resample=ResampleConfig(enabled=False),
            reward_weights={"hits": 1.0, "sim": 0.0}, seed=0)
        trainer = GRPOTrainer(build_toy_model(toy), ToyEnv(toy), ToyScorer(toy), prompts, config)
        hp = StepHyperparams(0.2, 0.3, 1.0)
        times = []
        for step in range(args.steps + 1):
            start = time.perf_counter()
            trainer.train_step(trainer.prompts_for_step(step), hp)
            times.append(time.perf_counter() - start)
    return times[1:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--generations", type=int, default=8)
    parser.add_argument("--completion", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=256)
    args = parser.parse_args()
    torch.manual_seed(0)
    toy = ToyConfig(vocab_size=args.vocab, hidden_size=args.hidden, num_layers=args.layers, num_heads=4,
                    prompt_length=8, num_prompts=64, target_tokens=tuple(range(1, args.vocab // 8)))
    prompts = toy_prompts(toy)
    trl_times = bench_trl(toy, prompts, args)
    our_times = bench_ours(toy, prompts, args)
    trl_s, our_s = statistics.median(trl_times), statistics.median(our_times)
    print(f"model: Llama hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}; "
          f"{args.prompts} prompts x {args.generations} generations, completion <= {args.completion} tokens; "
          f"{torch.get_num_threads()} threads; median of {args.steps} steps after one warm-up")
    print(f"TRL GRPOTrainer  {trl_s * 1000:8.1f} ms/step")
    print(f"vocalign         {our_s * 1000:8.1f} ms/step")
    print(f"ratio TRL/vocalign = {trl_s / our_s:.2f}x  (>1: vocalign faster)")


if __name__ == "__main__":
    main()
