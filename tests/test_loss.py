"""The clipped surrogate and its aggregation, against hand-computed values."""

import math

import pytest
import torch

from vocalign.rlhf.loss import aggregate, canonical_loss_type, clipped_surrogate, completion_logps
from vocalign.rlhf.toy_env import ToyConfig, build_toy_model


def test_clipped_surrogate_by_hand():
    # four tokens: ratio 1.5 / 0.5 / 0.5 / 1.5 with advantages +1 / -1 / +1 / -1, eps_low 0.2, eps_high 0.3
    logps = torch.log(torch.tensor([[1.5, 0.5, 0.5, 1.5]]))
    old = torch.zeros(1, 4)
    adv = torch.tensor([[1.0, -1.0, 1.0, -1.0]])
    terms = clipped_surrogate(logps, old, adv, epsilon_low=0.2, epsilon_high=0.3)
    # -min(1.5, 1.3) = -1.3 | -min(-0.5, -0.8) = 0.8 | -min(0.5, 0.8) = -0.5 | -min(-1.5, -1.3) = 1.5
    torch.testing.assert_close(terms.per_token_loss, torch.tensor([[-1.3, 0.8, -0.5, 1.5]]))
    assert terms.clipped_high.tolist() == [[True, False, False, False]]
    assert terms.clipped_low.tolist() == [[False, True, False, False]]
    assert terms.kl is None


def test_asymmetric_bounds_let_positive_tokens_grow_further():
    logps = torch.log(torch.tensor([[1.4]]))
    low_equal = clipped_surrogate(logps, torch.zeros(1, 1), torch.ones(1), epsilon_low=0.2, epsilon_high=0.2)
    clip_higher = clipped_surrogate(logps, torch.zeros(1, 1), torch.ones(1), epsilon_low=0.2, epsilon_high=0.5)
    assert low_equal.per_token_loss.item() == pytest.approx(-1.2)
    assert clip_higher.per_token_loss.item() == pytest.approx(-1.4)


def test_k3_kl_by_hand():
    logps = torch.zeros(1, 1)
    ref = torch.full((1, 1), math.log(2.0))
    terms = clipped_surrogate(logps, logps, torch.zeros(1), epsilon_low=0.2, epsilon_high=0.3, ref_logps=ref, beta=0.5)
    # k3 = e^d - d - 1 with d = log 2 -> 2 - 0.693147 - 1 = 0.306853; advantage 0 leaves only beta * k3
    assert terms.kl.item() == pytest.approx(0.3068528)
    assert terms.per_token_loss.item() == pytest.approx(0.5 * 0.3068528)
    with pytest.raises(ValueError, match="ref_logps"):
        clipped_surrogate(logps, logps, torch.zeros(1), epsilon_low=0.2, epsilon_high=0.3, beta=0.1)


def test_aggregation_by_hand():
    loss = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    # token_mean: (1 + 2 + 4) / 3; seq_mean: ((1 + 2) / 2 + 4 / 1) / 2; dr_grpo: 7 / (2 * 4)
    assert aggregate(loss, mask, "token_mean", num_tokens=3, num_sequences=2).item() == pytest.approx(7 / 3)
    assert aggregate(loss, mask, "seq_mean", num_tokens=3, num_sequences=2).item() == pytest.approx(2.75)
    assert aggregate(loss, mask, "dr_grpo", num_tokens=3, num_sequences=2,
                     max_completion_length=4).item() == pytest.approx(0.875)
    with pytest.raises(ValueError, match="max_completion_length"):
        aggregate(loss, mask, "dr_grpo", num_tokens=3, num_sequences=2)


@pytest.mark.parametrize("loss_type", ["token_mean", "seq_mean", "dr_grpo"])
def test_micro_batches_sum_to_the_full_batch_loss(loss_type):
    g = torch.Generator().manual_seed(0)
    loss = torch.randn(6, 5, generator=g)
    mask = (torch.rand(6, 5, generator=g) > 0.3).long()
    mask[:, 0] = 1
    kw = dict(num_tokens=mask.sum().item(), num_sequences=6, max_completion_length=5)
    full = aggregate(loss, mask, loss_type, **kw)
    parts = sum(aggregate(loss[i:i + 2], mask[i:i + 2], loss_type, **kw) for i in range(0, 6, 2))
    torch.testing.assert_close(parts, full)


def test_loss_type_names_and_trl_aliases():
    assert canonical_loss_type("dapo") == "token_mean"
    assert canonical_loss_type("grpo") == "seq_mean"
    assert canonical_loss_type("dr_grpo") == "dr_grpo"
    with pytest.raises(ValueError, match="loss_type must be one of"):
        canonical_loss_type("bnpo2")


def test_completion_logps_match_a_naive_full_softmax():
    model = build_toy_model(ToyConfig()).eval()
    ids = torch.tensor([[0, 0, 5, 6, 7, 1, 2, 3], [4, 5, 6, 7, 8, 9, 1, 0]])
    attention = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1, 1]])
    got = completion_logps(model, ids, attention, logits_to_keep=3, temperature=0.7)
    position_ids = (attention.cumsum(-1) - 1).clamp(min=0)
    logits = model(input_ids=ids, attention_mask=attention, position_ids=position_ids).logits[:, -4:-1] / 0.7
    naive = logits.log_softmax(-1).gather(-1, ids[:, -3:].unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(got, naive, atol=1e-5, rtol=1e-5)
