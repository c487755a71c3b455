"""The update made exact and observable: dropout off, the diagnostics GRPO users read first, micro-batches trimmed
to their own length, and samples that could not be scored masked or counted instead of ending the run."""

import math
import resource

import pytest
import torch

from vocalign.rlhf.advantages import token_advantages
from vocalign.rlhf.batching import plan_micro_batches
from vocalign.rlhf.config import GRPOConfig, LoraSettings
from vocalign.rlhf.loss import SurrogateTerms, completion_logps
from vocalign.rlhf.metrics import UpdateStats, completion_metrics
from vocalign.rlhf.resampling import ResampleConfig
from vocalign.rlhf.rollout import Rollouts, Scorer, Scores
from vocalign.rlhf.schedules import StepHyperparams
from vocalign.rlhf.toy_env import ToyConfig, ToyEnv, ToyScorer, build_toy_model, toy_prompts
from vocalign.rlhf.trainer import GRPOTrainer

TOY = ToyConfig()
HP = StepHyperparams(epsilon=0.2, epsilon_high=0.3, temperature=1.0)


def trainer_for(tmp_path, scorer=None, model=None, **overrides):
    settings = {"output_dir": str(tmp_path / "run"), "max_steps": 1, "prompts_per_step": 2, "num_generations": 4,
                "micro_batch_size": 8, "learning_rate": 1e-2, "max_completion_length": 8, "report_to": "none",
                "save_steps": 1000, "resample": ResampleConfig(enabled=False)}
    settings.update(overrides)
    return GRPOTrainer(model or build_toy_model(TOY), ToyEnv(TOY), scorer or ToyScorer(TOY), toy_prompts(TOY),
                       GRPOConfig(**settings))


def test_gradient_checkpointing_changes_no_figure_of_the_step(tmp_path):
    """Recomputing activations in the backward pass trades time for memory, never the update."""
    plain = trainer_for(tmp_path / "plain", disable_dropout=True).train()[0]
    checkpointed = trainer_for(tmp_path / "ckpt", disable_dropout=True, gradient_checkpointing=True).train()[0]
    for key in ("loss", "grad_norm", "reward/mean"):
        assert checkpointed[key] == pytest.approx(plain[key], rel=1e-6), key


def with_dropout(p=0.1):
    """The toy Llama with attention dropout, as a checkpoint trained with it would be configured."""
    model = build_toy_model(TOY)
    model.config.attention_dropout = p
    for module in model.modules():
        if hasattr(module, "attention_dropout"):
            module.attention_dropout = p
    return model


@pytest.mark.parametrize("disable", [True, False])
def test_first_ratio_is_one_with_the_lora_recipes_dropout(tmp_path, disable):
    """The LoRA recipe's settings (the released adapter: lora_dropout 0.1) with lr 0: with dropout off the update's
    log-probs are the sampler's (up to float rounding between cached decoding and one forward), nothing clips."""
    trainer = trainer_for(tmp_path, model=with_dropout(), learning_rate=0.0, lora=LoraSettings(),
                          disable_dropout=disable)
    (metrics,) = trainer.train()
    if disable:
        assert metrics["ratio/mean_abs_dev"] < 1e-5 and metrics["kl_to_sampler"] < 1e-9
        assert metrics["clip/low_frac"] == 0 and metrics["clip/high_frac"] == 0
    else:  # what the issue measured: dropout moves the ratio before any update
        assert metrics["ratio/mean_abs_dev"] > 1e-3


def test_dropout_off_makes_training_mode_forwards_deterministic(tmp_path):
    trainer = trainer_for(tmp_path, model=with_dropout(0.5), lora=LoraSettings(lora_dropout=0.5))
    model = trainer.model.train()
    ids = torch.tensor([[3, 4, 5, 6, 7, 8]])
    a, b = (completion_logps(model, ids, torch.ones_like(ids), 3, 1.0) for _ in range(2))
    assert torch.equal(a, b)


def test_sampler_entropy_is_the_sampling_distributions(tmp_path):
    from vocalign.policies.sampling import sample

    model = build_toy_model(TOY).eval()
    ids = torch.tensor([[3, 4, 5, 6]] * 3)
    out = sample(model, ids, torch.ones_like(ids), max_new_tokens=5, stop_token_id=0, pad_token_id=0,
                 temperature=0.7)
    full = torch.cat([ids, out.tokens], 1)
    logits = model(input_ids=full).logits[:, ids.shape[1] - 1:-1].float() / 0.7
    expected = torch.distributions.Categorical(logits=logits).entropy() * out.mask
    torch.testing.assert_close(out.entropy, expected, atol=1e-5, rtol=1e-5)
    assert (out.entropy[out.mask.bool()] > 0).all()


def test_trainer_reports_entropy_truncation_and_memory(tmp_path):
    """max_completion_length 2 with no stop before it: every sample that did not draw the stop token is truncated."""
    trainer = trainer_for(tmp_path, max_completion_length=2)
    (metrics,) = trainer.train()
    rollouts = trainer.last_rollouts
    mask = rollouts.completion_mask.float()
    assert metrics["entropy"] == pytest.approx(((rollouts.entropies * mask).sum() / mask.sum()).item(), rel=1e-6)
    assert metrics["completions/truncated_frac"] == pytest.approx((~rollouts.stopped).float().mean().item())
    assert 0 < metrics["completions/truncated_frac"]
    assert metrics["memory/peak_gb"] == pytest.approx(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
                                                      rel=0.05)


def test_completion_metrics_by_hand():
    class OneProcess:
        device = torch.device("cpu")

        @staticmethod
        def gather(x):
            return x

    ids = torch.ones(4, 3, dtype=torch.long)
    mask = torch.tensor([[1, 1, 1], [1, 0, 0], [1, 1, 0], [1, 1, 1]])
    entropies = torch.tensor([[1.0, 2.0, 3.0], [4.0, 9.0, 9.0], [1.0, 1.0, 9.0], [2.0, 2.0, 2.0]])
    rollouts = Rollouts(ids, ids, ids, mask, torch.zeros(4, 3), 2, entropies=entropies,
                        stopped=torch.tensor([False, True, True, False]))
    rewards = torch.tensor([[[1.0, 0.0], [0.5, 1.0]], [[0.0, 1.0], [0.25, 2.0]]], dtype=torch.float64)
    out = completion_metrics(OneProcess(), rollouts, rewards, [1.0, 0.5])
    assert out["entropy"] == pytest.approx((6 + 4 + 2 + 6) / 9)
    assert out["completions/truncated_frac"] == 0.5
    assert out["completions/truncated_reward_mean"] == pytest.approx((1.0 + 1.25) / 2)  # samples 0 and 3


def test_ratio_statistics_by_hand():
    stats = UpdateStats(num_iterations=1, batch_tokens=2)
    log_ratio = torch.tensor([[math.log(1.5), math.log(0.5), 7.0]])
    zeros = torch.zeros(1, 3, dtype=torch.bool)
    terms = SurrogateTerms(torch.zeros(1, 3), zeros, zeros, None, log_ratio)
    stats.add(torch.tensor(0.0), terms, torch.tensor([[1, 1, 0]]))
    assert stats.totals["ratio/mean_abs_dev"] == pytest.approx(0.5)
    assert stats.totals["kl_to_sampler"] == pytest.approx(((0.5 - math.log(1.5)) + (-0.5 - math.log(0.5))) / 2)


def test_truncated_completions_can_be_left_out_of_the_loss(tmp_path):
    """Every completion hits the cap (one token, stop forbidden before it): masked, the step changes nothing."""
    changed = {}
    for masked in (False, True):
        trainer = trainer_for(tmp_path / str(masked), max_completion_length=1, min_completion_length=1,
                              mask_truncated_completions=masked)
        before = [p.detach().clone() for p in trainer.model.parameters()]
        (metrics,) = trainer.train()
        assert metrics["completions/truncated_frac"] == 1.0
        changed[masked] = any(not torch.equal(a, b) for a, b in zip(before, trainer.model.parameters()))
    assert changed == {False: True, True: False}


def test_micro_batches_group_by_length_and_trim():
    completion_mask = torch.tensor([[1, 0, 0, 0], [1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 0]])
    prompt_mask = torch.tensor([[0, 0, 1], [0, 1, 1], [0, 0, 1], [1, 1, 1]])
    plan = plan_micro_batches(prompt_mask, completion_mask, 2, group_by_length=True)
    assert [mb.rows.tolist() for mb in plan] == [[1, 3], [2, 0]]
    assert [(mb.prompt_start, mb.width) for mb in plan] == [(0, 4), (2, 2)]
    plain = plan_micro_batches(prompt_mask, completion_mask, 2, group_by_length=False)
    assert [(mb.rows.tolist(), mb.prompt_start, mb.width) for mb in plain] == [([0, 1], 0, 4), ([2, 3], 0, 4)]


def fixed_rollouts(num_generations=4, num_prompts=2, seed=0):
    """Rollouts of varied lengths (1-10 tokens, prompts of 2-4 tokens), the old log-probs the toy model's own."""
    gen = torch.Generator().manual_seed(seed)
    n = num_generations * num_prompts
    lengths = torch.randint(1, 11, (n,), generator=gen)
    prompt_lengths = torch.randint(2, 5, (n,), generator=gen)
    ids = torch.randint(1, TOY.vocab_size, (n, 10), generator=gen)
    mask = (torch.arange(10) < lengths.unsqueeze(1)).long()
    prompt_ids = torch.randint(1, TOY.vocab_size, (n, 4), generator=gen)
    prompt_mask = (torch.arange(4) >= 4 - prompt_lengths.unsqueeze(1)).long()
    prompt_ids = prompt_ids * prompt_mask
    with torch.no_grad():
        logps = completion_logps(build_toy_model(TOY), torch.cat([prompt_ids, ids * mask], 1),
                                 torch.cat([prompt_mask, mask], 1), 10, 1.0)
    return Rollouts(prompt_ids, prompt_mask, ids * mask, mask, logps * mask, num_generations)


def update(tmp_path, rollouts, advantages, scored, **overrides):
    trainer = trainer_for(tmp_path, **overrides)
    stats = trainer.optimise(rollouts, advantages, scored, HP)
    return stats, [p.detach().clone() for p in trainer.model.parameters()]


def test_length_grouped_micro_batches_give_the_gradient_of_full_width_ones(tmp_path):
    rollouts = fixed_rollouts()
    advantages = torch.randn(8, generator=torch.Generator().manual_seed(1))
    scored = torch.ones(8, dtype=torch.bool)
    settings = dict(micro_batch_size=2, num_iterations=2, beta=0.1)
    grouped, w_grouped = update(tmp_path / "g", rollouts, advantages, scored, group_by_length=True, **settings)
    full, w_full = update(tmp_path / "f", rollouts, advantages, scored, group_by_length=False, **settings)
    for key in ("loss", "grad_norm", "kl", "ratio/mean_abs_dev"):
        assert grouped[key] == pytest.approx(full[key], rel=1e-5, abs=1e-8), key
    start = list(build_toy_model(TOY).parameters())
    for a, b, w0 in zip(w_grouped, w_full, start):  # each tensor's update, to 1e-5 of its size
        assert (a - b).norm() <= 1e-5 * (b - w0).norm()


def test_a_masked_sample_takes_no_part_in_the_loss(tmp_path):
    """lr 0, one group of 8: the loss with sample 3 masked (whatever its advantage) is the loss without it."""
    rollouts = fixed_rollouts(num_generations=1, num_prompts=8)
    advantages = torch.randn(8, generator=torch.Generator().manual_seed(2))
    advantages[3] = 50.0
    settings = dict(learning_rate=0.0, prompts_per_step=8, num_generations=1, micro_batch_size=8)
    scored = torch.ones(8, dtype=torch.bool)
    scored[3] = False
    masked, _ = update(tmp_path / "m", rollouts, advantages, scored, **settings)
    keep = torch.tensor([0, 1, 2, 4, 5, 6, 7])
    without = Rollouts(*(t[keep] for t in (rollouts.prompt_ids, rollouts.prompt_mask, rollouts.completion_ids,
                                          rollouts.completion_mask, rollouts.old_logps)), 1)
    alone, _ = update(tmp_path / "a", without, advantages[keep], torch.ones(7, dtype=torch.bool), **settings)
    assert masked["loss"] == pytest.approx(alone["loss"], rel=1e-6)
    full, _ = update(tmp_path / "f", rollouts, advantages, torch.ones(8, dtype=torch.bool), **settings)
    assert full["loss"] != pytest.approx(alone["loss"], rel=1e-3)


class PartlyScoredDouble(Scorer):
    """Test double: `hits` could not score samples 1 and 6 (NaN, None), `sim` found sample 2 invalid (value 0)."""

    reward_names = ("hits", "sim")

    def score(self, rollouts):
        n = len(rollouts)
        hits = [float(i % 3) for i in range(n)]
        hits[1], hits[6] = float("nan"), None
        sim = [0.5 + 0.1 * (i % 2) for i in range(n)]
        sim[2] = 0.0
        return Scores({"hits": hits, "sim": sim}, {"sim": [i == 2 for i in range(n)]})


def test_unscored_samples_are_masked_and_counted(tmp_path):
    trainer = trainer_for(tmp_path, PartlyScoredDouble(), max_masked_frac=0.25)
    (metrics,) = trainer.train()
    assert metrics["rewards/hits/masked"] == 2 and metrics["rewards/sim/masked"] == 0
    assert metrics["rewards/sim/invalid"] == 1 and metrics["rewards/hits/invalid"] == 0
    assert metrics["masked_frac"] == 0.25
    assert metrics["rewards/hits/mean"] == pytest.approx((0 + 2 + 0 + 1 + 2 + 1) / 6)  # samples 0, 2-5, 7


def test_too_many_unscored_samples_stop_the_run_with_the_counts(tmp_path):
    trainer = trainer_for(tmp_path, PartlyScoredDouble(), max_masked_frac=0.2)
    with pytest.raises(RuntimeError, match=r"25% of this step's 8 samples could not be scored \(hits: 2, sim: 0\)"):
        trainer.train()
    trainer = trainer_for(tmp_path / "b", PartlyScoredDouble(), max_masked_frac=0.5, max_invalid_frac=0.1)
    with pytest.raises(RuntimeError, match=r"were invalid outputs of the policy \(hits: 0, sim: 1"):
        trainer.train()


def test_token_advantages_by_hand():
    # touched values -1, 0 | 0, 0: mean -0.25, unbiased std 0.5 -> z = -1.5, 0.5 | 0.5, 0.5; weight 2
    advantages = torch.tensor([[1.0, -1.0]], dtype=torch.float64)
    values = torch.tensor([[[-1.0, 0.0, 7.0], [0.0, 0.0, 7.0]]], dtype=torch.float64)
    touched = torch.tensor([[[True, True, False], [True, True, False]]])
    out, _ = token_advantages(advantages, [values], [touched], [2.0], eps=0.0)
    assert out.tolist() == [[[-2.0, 2.0, 1.0], [0.0, 0.0, -1.0]]]
    flat, _ = token_advantages(advantages, [torch.zeros_like(values)], [touched], [2.0], eps=0.0)
    assert flat.tolist() == [[[1.0, 1.0, 1.0], [-1.0, -1.0, -1.0]]]  # nothing varies: sequence-level only


def test_redistributed_token_credit_keeps_each_samples_mean_advantage():
    # the same case: terms 2z = -3, 1 | 1, 1; each sample's touched mean (-1 | 1) taken out -> -2, 2 | 0, 0
    advantages = torch.tensor([[1.0, -1.0]], dtype=torch.float64)
    values = torch.tensor([[[-1.0, 0.0, 7.0], [0.0, 0.0, 7.0]]], dtype=torch.float64)
    touched = torch.tensor([[[True, True, False], [True, True, False]]])
    out, terms = token_advantages(advantages, [values], [touched], [2.0], composition="redistribute", eps=0.0)
    assert out.tolist() == [[[-1.0, 3.0, 1.0], [-1.0, -1.0, -1.0]]]
    assert terms[0].tolist() == [[[-2.0, 2.0, 0.0], [0.0, 0.0, 0.0]]]
    with pytest.raises(ValueError, match="composition must be one of"):
        token_advantages(advantages, [values], [touched], [2.0], composition="multiply")


def test_per_token_advantages_shared_by_a_sequence_give_the_sequence_level_step(tmp_path):
    rollouts = fixed_rollouts()
    advantages = torch.randn(8, generator=torch.Generator().manual_seed(3))
    per_token = advantages.unsqueeze(1).expand(8, rollouts.completion_ids.shape[1]).contiguous()
    scored = torch.ones(8, dtype=torch.bool)
    settings = dict(micro_batch_size=4, num_iterations=2, beta=0.1)
    sequence, w_sequence = update(tmp_path / "s", rollouts, advantages, scored, **settings)
    tokens, w_tokens = update(tmp_path / "t", rollouts, per_token, scored, **settings)
    assert sequence == tokens
    assert all(torch.equal(a, b) for a, b in zip(w_sequence, w_tokens))


def test_toy_run_with_token_level_credit_reports_its_reach(tmp_path):
    trainer = trainer_for(tmp_path, token_reward_weights={"hits": 0.5})
    (metrics,) = trainer.train()
    assert metrics["token_credit/hits/touched_frac"] == 1.0  # the toy's hits reward has a span on every token
    assert metrics["token_credit/hits/abs_mean"] > 0
    with pytest.raises(ValueError, match=r"token_reward_weights names \['sim'\], but the scorer returned no spans"):
        trainer_for(tmp_path / "sim", token_reward_weights={"sim": 0.5}).train()
    with pytest.raises(ValueError, match=r"token_reward_weights names \['cer'\], which are not rewards"):
        trainer_for(tmp_path / "cer", token_reward_weights={"cer": 0.5})


def test_tts_env_maps_seconds_to_its_tokens():
    from vocalign.rlhf.tts_env import TTSEnv

    env = TTSEnv.__new__(TTSEnv)  # only its token timing matters here
    env.token_timing = {"token_rate_hz": 25.0, "token_delay_s": 0.0}
    mask = torch.tensor([[1] * 10 + [0] * 2, [1] * 12])
    ids = torch.zeros_like(mask)
    rollouts = Rollouts(ids, ids, ids, mask, ids.float(), 2)
    values, touched = env.localise(rollouts, [[(0.08, 0.2, -1.0)], [(0.4, 0.48, -1.0)]])
    assert touched[0].nonzero().flatten().tolist() == [2, 3, 4] and values[0, 2:5].tolist() == [-1.0] * 3
    assert touched[1].nonzero().flatten().tolist() == [10, 11] and values.shape == (2, 12)
