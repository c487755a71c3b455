"""The update's time with micro-batches grouped by completion length and trimmed to their own widest row
(``group_by_length: true``, the default) against every micro-batch padded to the batch's widest completion
(``false``, what vocalign did before), on the same batch, model and machine, in this run.

The model is the demo TTS's speech LM (demo/ckpt/llm, 4 layers, 192 wide); the batch is 64 completions
with a 20x spread of lengths (10 to 200 tokens, uniform, as TTS utterances of one batch vary) after 60-token prompts,
in micro-batches of 8. Both settings give the same gradient (tests/test_update.py); the ratio is what to read.
Run: .venv/bin/python bench/update_padding.py [--repeats 3] [--micro-batch 8] [--min-length 10] [--max-length 200]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("WANDB_MODE", "disabled")

import torch  # noqa: E402
from transformers import LlamaForCausalLM  # noqa: E402

from vocalign.rlhf.config import GRPOConfig  # noqa: E402
from vocalign.rlhf.loss import completion_logps  # noqa: E402
from vocalign.rlhf.resampling import ResampleConfig  # noqa: E402
from vocalign.rlhf.rollout import Rollouts  # noqa: E402
from vocalign.rlhf.schedules import StepHyperparams  # noqa: E402
from vocalign.rlhf.toy_env import ToyConfig, ToyEnv, ToyScorer, toy_prompts  # noqa: E402
from vocalign.rlhf.trainer import GRPOTrainer  # noqa: E402

DEMO_LLM = Path(__file__).resolve().parents[1] / "demo" / "ckpt" / "llm"


def batch(model: torch.nn.Module, n: int, prompt_length: int, lengths: torch.Tensor) -> Rollouts:
    gen = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    width = int(lengths.max())
    mask = (torch.arange(width) < lengths.unsqueeze(1)).long()
    ids = torch.randint(2, vocab, (n, width), generator=gen) * mask
    prompt = torch.randint(2, vocab, (n, prompt_length), generator=gen)
    with torch.no_grad():
        logps = completion_logps(model, torch.cat([prompt, ids], 1), torch.cat([torch.ones_like(prompt), mask], 1),
                                 width, 1.0)
    return Rollouts(prompt, torch.ones_like(prompt), ids, mask, logps * mask, num_generations=8)


def trainer_for(group_by_length: bool, n: int, micro_batch: int) -> GRPOTrainer:
    config = GRPOConfig(output_dir=tempfile.mkdtemp(), max_steps=1, prompts_per_step=n // 8, num_generations=8,
                        micro_batch_size=micro_batch, learning_rate=1e-5, report_to="none",
                        resample=ResampleConfig(enabled=False), group_by_length=group_by_length)
    toy = ToyConfig()  # the trainer needs an environment and a scorer; the update never calls them
    return GRPOTrainer(LlamaForCausalLM.from_pretrained(DEMO_LLM), ToyEnv(toy), ToyScorer(toy), toy_prompts(toy),
                       config)


def time_updates(rollouts: Rollouts, micro_batch: int, repeats: int) -> dict[bool, float]:
    """Median seconds of one update per setting, the two settings measured in turn so that a machine whose load
    changes during the run slows both alike."""
    n = len(rollouts)
    trainers = {grouped: trainer_for(grouped, n, micro_batch) for grouped in (False, True)}
    advantages = torch.randn(n, generator=torch.Generator().manual_seed(1))
    hp = StepHyperparams(0.2, 0.3, 1.0)
    scored = torch.ones(n, dtype=torch.bool)
    times: dict[bool, list[float]] = {False: [], True: []}
    for trainer in trainers.values():
        trainer.optimise(rollouts, advantages, scored, hp)  # warm-up
    for _ in range(repeats):
        for grouped, trainer in trainers.items():
            t0 = time.perf_counter()
            trainer.optimise(rollouts, advantages, scored, hp)
            times[grouped].append(time.perf_counter() - t0)
    return {grouped: statistics.median(t) for grouped, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--prompt-length", type=int, default=60)
    parser.add_argument("--min-length", type=int, default=10)
    parser.add_argument("--max-length", type=int, default=200)
    args = parser.parse_args()
    lengths = torch.randint(args.min_length, args.max_length + 1, (args.rows,),
                            generator=torch.Generator().manual_seed(2))
    rollouts = batch(LlamaForCausalLM.from_pretrained(DEMO_LLM), args.rows, args.prompt_length, lengths)
    median = time_updates(rollouts, args.micro_batch, args.repeats)
    full, grouped = median[False], median[True]
    real = int(lengths.sum())
    print(f"{args.rows} completions of {args.min_length}-{args.max_length} tokens ({real} real tokens, "
          f"{args.rows * int(lengths.max())} when padded to the widest), micro-batches of {args.micro_batch}, "
          f"{torch.get_num_threads()} threads")
    print(f"padded to the batch's widest: {full:.3f} s   grouped by length: {grouped:.3f} s   "
          f"speed-up {full / grouped:.2f}x")


if __name__ == "__main__":
    main()
