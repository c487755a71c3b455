"""Parity with TRL 1.16's GRPOTrainer: the same loss on the same batch, the same normalize_then_sum advantages."""

import pytest
import torch
from datasets import Dataset
from trl import GRPOConfig as TRLConfig
from trl import GRPOTrainer as TRLTrainer

from vocalign.rlhf.advantages import compute_advantages
from vocalign.rlhf.loss import aggregate, clipped_surrogate, completion_logps
from vocalign.rlhf.toy_env import ToyConfig, build_toy_model, toy_tokenizer

G = 4


def trl_trainer(tmp_path, reward_funcs, **overrides):
    cfg = ToyConfig()
    model = build_toy_model(cfg)
    prompts = Dataset.from_dict({"prompt": ["t1 t2 t3 t4", "t5 t6 t7 t8"] * 4})
    args = TRLConfig(output_dir=str(tmp_path), per_device_train_batch_size=2 * G, num_generations=G,
                     max_completion_length=6, report_to="none", use_cpu=True, bf16=False, logging_steps=1,
                     epsilon=0.2, epsilon_high=0.3, beta=0.0, **overrides)
    return TRLTrainer(model=model, reward_funcs=reward_funcs, args=args, train_dataset=prompts,
                      processing_class=toy_tokenizer(cfg.vocab_size))


def constant_reward(completions, **_):
    return [0.0] * len(completions)


@pytest.mark.parametrize("loss_type, ours", [("dapo", "token_mean"), ("grpo", "seq_mean"), ("dr_grpo", "dr_grpo")])
def test_loss_equals_trl_compute_loss(tmp_path, loss_type, ours):
    trainer = trl_trainer(tmp_path, [constant_reward], loss_type=loss_type)
    model = trainer.model
    model.train()
    g = torch.Generator().manual_seed(1)
    b, p, c = 8, 4, 6
    prompt_ids = torch.randint(1, 16, (b, p), generator=g)
    completion_ids = torch.randint(0, 16, (b, c), generator=g)
    completion_mask = torch.ones(b, c, dtype=torch.long)
    completion_mask[0, 3:] = 0
    completion_mask[5, 1:] = 0
    with torch.no_grad():
        current = completion_logps(model, torch.cat([prompt_ids, completion_ids], 1),
                                   torch.ones(b, p + c, dtype=torch.long), c, 1.0)
    # old log-probs away from the current ones so that both clip bounds are hit
    old_logps = current + torch.empty(b, c).uniform_(-0.6, 0.6, generator=g)
    advantages = torch.randn(b, generator=g)
    inputs = {
        "prompt_ids": prompt_ids, "prompt_mask": torch.ones(b, p, dtype=torch.long),
        "completion_ids": completion_ids, "completion_mask": completion_mask,
        "advantages": advantages, "old_per_token_logps": old_logps,
        "num_items_in_batch": completion_mask.sum(),
    }
    trainer.current_gradient_accumulation_steps = 1
    theirs = trainer._compute_loss(model, inputs)

    logps = completion_logps(model, torch.cat([prompt_ids, completion_ids], 1),
                             torch.ones(b, p + c, dtype=torch.long), c, 1.0)
    terms = clipped_surrogate(logps, old_logps, advantages, epsilon_low=0.2, epsilon_high=0.3)
    mine = aggregate(terms.per_token_loss, completion_mask, ours, num_tokens=completion_mask.sum().item(),
                     num_sequences=b, max_completion_length=6)
    assert terms.clipped_low.any() and terms.clipped_high.any()
    assert abs(mine.item() - theirs.item()) <= 1e-6


def test_batch_hierarchical_equals_trl_normalize_then_sum(tmp_path):
    # Two rewards per completion, fixed in advance; TRL normalises them through its own code path.
    g = torch.Generator().manual_seed(3)
    table = torch.rand(2 * G, 2, generator=g).double()
    table[G:, 1] = 0.25  # prompt 1: the second reward is flat

    def reward_a(completions, **_):
        return table[: len(completions), 0].tolist()

    def reward_b(completions, **_):
        return table[: len(completions), 1].tolist()

    trainer = trl_trainer(tmp_path, [reward_a, reward_b], multi_objective_aggregation="normalize_then_sum",
                          reward_weights=[1.0, 0.3])
    inputs = [{"prompt": text} for text in ["t1 t2 t3 t4", "t5 t6 t7 t8"] for _ in range(G)]
    out = trainer._generate_and_score_completions(inputs)
    ours = compute_advantages(table.view(2, G, 2), [1.0, 0.3], normalization="hierarchical",
                              scale_rewards="batch", eps=1e-4)
    torch.testing.assert_close(ours.reshape(-1).float(), out["advantages"].float(), atol=1e-6, rtol=0)
