"""The batched KV-cache sampler: lengths, stop token, log-probs, repetition-aware sampling."""

import torch

from vocalign.policies.sampling import RepetitionAwareSampling, filter_logits, sample
from vocalign.rlhf.loss import completion_logps
from vocalign.rlhf.toy_env import ToyConfig, build_toy_model

STOP, PAD = 0, 0


class LogitBiasDouble(torch.nn.Module):
    """Test double: the toy LM with a fixed bias added to its logits, to make one token dominate."""

    def __init__(self, model, token, amount):
        super().__init__()
        self.inner, self.config = model, model.config
        self.bias = torch.zeros(model.config.vocab_size)
        self.bias[token] = amount

    def forward(self, **kwargs):
        out = self.inner(**kwargs)
        out.logits = out.logits + self.bias
        return out


def model_and_prompts(n=6):
    model = build_toy_model(ToyConfig(seed=3)).eval()
    ids = torch.tensor([[0, 0, 4, 5], [7, 8, 9, 10]] * (n // 2))
    mask = (torch.arange(4) >= torch.tensor([[2], [0]] * (n // 2))).long()
    return model, ids, mask


def test_per_row_min_and_max_lengths_are_obeyed():
    model, ids, mask = model_and_prompts()
    torch.manual_seed(0)
    min_len = torch.tensor([3, 0, 5, 0, 2, 0])
    max_len = torch.tensor([4, 2, 9, 1, 6, 3])
    out = sample(model, ids, mask, max_new_tokens=max_len, min_new_tokens=min_len, stop_token_id=STOP,
                 pad_token_id=PAD, temperature=3.0)  # hot: the stop token is drawn often
    lengths = out.mask.sum(-1)
    assert (lengths <= max_len).all() and (lengths >= min_len).all()
    for row in range(len(ids)):
        body = out.tokens[row, : lengths[row]]
        assert (body[:-1] != STOP).all()  # nothing after a stop token
        assert bool(out.stopped[row]) == (body[-1].item() == STOP)
        assert (out.logps[row, lengths[row]:] == 0).all()


def test_min_length_masks_the_stop_token():
    model, ids, mask = model_and_prompts()
    model = LogitBiasDouble(model, STOP, 50.0)  # the stop token overwhelmingly likely
    out = sample(model, ids, mask, max_new_tokens=10, min_new_tokens=4, stop_token_id=STOP, pad_token_id=PAD)
    assert (out.mask.sum(-1) == 5).all() and out.stopped.all()


def test_returned_logps_equal_a_fresh_forward_at_the_sampling_temperature():
    model, ids, mask = model_and_prompts()
    torch.manual_seed(1)
    out = sample(model, ids, mask, max_new_tokens=7, stop_token_id=STOP, pad_token_id=PAD, temperature=0.7,
                 top_k=8, top_p=0.9)
    full_ids = torch.cat([ids, out.tokens], 1)
    full_mask = torch.cat([mask, out.mask], 1)
    fresh = completion_logps(model, full_ids, full_mask, out.tokens.shape[1], 0.7)
    torch.testing.assert_close(fresh * out.mask, out.logps, atol=1e-5, rtol=1e-4)


def test_top_k_and_top_p_filtering_as_released():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0]])
    assert torch.isinf(filter_logits(logits, 2, None)).tolist() == [[False, False, True, True]]
    # probabilities 0.644, 0.237, 0.087, 0.032: top_p 0.7 keeps the two whose mass first reaches 0.7
    assert torch.isinf(filter_logits(logits, None, 0.7)).tolist() == [[False, False, True, True]]
    assert not torch.isinf(filter_logits(logits, None, 1.0)).any()
    # top-p counts the full distribution's mass, not the mass renormalised inside the top-k: renormalised within
    # the top 3 the first two hold 0.910 >= 0.9 and would be enough; in the full distribution they hold 0.881 < 0.9,
    # so the third is kept too
    assert torch.isinf(filter_logits(logits, 3, 0.9)).tolist() == [[False, False, False, True]]
    # ties are ranked by index (a stable sort), so top-k keeps exactly k
    assert torch.isinf(filter_logits(torch.zeros(1, 4), 2, None)).tolist() == [[False, False, True, True]]


def test_ras_breaks_runs_of_one_token():
    model, ids, mask = model_and_prompts(2)
    model = LogitBiasDouble(model, 5, 4.0)  # token 5 fills the nucleus at every step
    torch.manual_seed(0)
    plain = sample(model, ids, mask, max_new_tokens=30, stop_token_id=None, pad_token_id=PAD, top_p=0.5)
    torch.manual_seed(0)
    ras = sample(model, ids, mask, max_new_tokens=30, stop_token_id=None, pad_token_id=PAD, top_p=0.5,
                 ras=RepetitionAwareSampling(window=10, tau=0.1))
    assert (plain.tokens == 5).float().mean() > 0.9
    assert (ras.tokens == 5).float().mean() < (plain.tokens == 5).float().mean()


def test_allowed_tokens_restrict_what_is_drawn():
    model, ids, mask = model_and_prompts()
    allowed = torch.zeros(16, dtype=torch.bool)
    allowed[[0, 10, 11]] = True
    out = sample(model, ids, mask, max_new_tokens=8, stop_token_id=STOP, pad_token_id=PAD, allowed_tokens=allowed)
    assert torch.isin(out.tokens[out.mask.bool()], torch.tensor([0, 10, 11])).all()


def test_ras_threshold_is_window_times_tau_as_released():
    model, ids, mask = model_and_prompts(64)
    model = LogitBiasDouble(model, 5, 3.0)  # 5 is the top token, but far from certain in the full distribution
    settings = {"max_new_tokens": 2, "stop_token_id": None, "pad_token_id": PAD, "top_k": 1}
    torch.manual_seed(0)
    # window 4, tau 0.3: a draw is redrawn when it already occurs >= 1.2 times, so one earlier 5 is not enough
    out = sample(model, ids, mask, ras=RepetitionAwareSampling(window=4, tau=0.3), **settings)
    assert (out.tokens == 5).all()
    # tau 0.25: >= 1.0, so the second 5 is redrawn from the whole distribution, and is not always 5 again
    out = sample(model, ids, mask, ras=RepetitionAwareSampling(window=4, tau=0.25), **settings)
    assert (out.tokens[:, 0] == 5).all() and (out.tokens[:, 1] != 5).any()
