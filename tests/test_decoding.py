"""Decoding with a static KV cache (the CUDA-graph path, run eagerly here) and compaction of finished rows, checked
against the dynamic-cache reference: same tokens and log-probs for the same seed."""

import pytest
import torch

from vocalign.policies.decoding import resolve_decoding
from vocalign.policies.sampling import RepetitionAwareSampling, sample
from vocalign.rlhf.loss import completion_logps
from vocalign.rlhf.toy_env import ToyConfig, build_toy_model

STOP, PAD = 0, 0


class BatchSizeSpy(torch.nn.Module):
    """Test double: the toy LM, recording how many rows each forward ran."""

    def __init__(self, model):
        super().__init__()
        self.inner, self.config = model, model.config
        self.rows = []

    def get_input_embeddings(self):
        return self.inner.get_input_embeddings()

    def forward(self, **kwargs):
        self.rows.append(kwargs["input_ids"].shape[0])
        return self.inner(**kwargs)


def prompts(n=8):
    """Left-padded prompts of different widths, and per-row length bounds."""
    ids = torch.randint(1, 16, (n, 6), generator=torch.Generator().manual_seed(0))
    pads = torch.tensor([0, 2, 3, 0, 5, 1, 4, 0])[:n]
    mask = (torch.arange(6) >= pads[:, None]).long()
    ids = ids * mask
    max_len = torch.tensor([12, 5, 9, 20, 3, 15, 7, 11])[:n]
    min_len = torch.tensor([2, 0, 3, 1, 0, 4, 2, 0])[:n]
    return ids, mask, max_len, min_len


def run(model, decoding, seed=1, **settings):
    ids, mask, max_len, min_len = prompts()
    torch.manual_seed(seed)
    return sample(model, ids, mask, max_new_tokens=max_len, min_new_tokens=min_len, stop_token_id=STOP,
                  pad_token_id=PAD, decoding=decoding, **settings)


@pytest.fixture(scope="module")
def model():
    return build_toy_model(ToyConfig(seed=3)).eval()


@pytest.mark.parametrize("settings", [
    dict(temperature=3.0),  # hot: rows stop at different steps
    dict(temperature=1.0, top_k=8, top_p=0.9, ras=RepetitionAwareSampling()),
])
def test_static_cache_gives_the_dynamic_caches_tokens_and_logps(model, settings):
    reference = run(model, "dynamic", **settings)
    static = run(model, "static", compact_finished=False, **settings)
    assert 0 < reference.stopped.sum() < len(reference.stopped)  # some rows stop early, some run to their maximum
    assert torch.equal(static.tokens, reference.tokens) and torch.equal(static.mask, reference.mask)
    torch.testing.assert_close(static.logps, reference.logps, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("decoding", ["dynamic", "static"])
def test_compaction_drops_finished_rows_and_keeps_every_rows_output(model, decoding):
    spy = BatchSizeSpy(model)
    greedy = dict(temperature=1.0, top_k=1)  # draws that do not depend on the random stream
    reference = run(model, "dynamic", compact_finished=False, **greedy)
    compacted = run(spy, decoding, compact_finished=True, **greedy)
    assert torch.equal(compacted.tokens, reference.tokens) and torch.equal(compacted.mask, reference.mask)
    torch.testing.assert_close(compacted.logps, reference.logps, atol=1e-5, rtol=1e-5)
    assert spy.rows[0] == 8 and min(spy.rows) < 4  # the batch shrank as rows finished


def test_compacted_sampling_reports_the_logps_of_what_it_drew(model):
    ids, mask, max_len, min_len = prompts()
    torch.manual_seed(2)
    out = sample(model, ids, mask, max_new_tokens=max_len, min_new_tokens=min_len, stop_token_id=STOP,
                 pad_token_id=PAD, temperature=2.0, decoding="static", compact_finished=True)
    lengths = out.mask.sum(-1)
    assert (lengths <= max_len).all() and (lengths >= min_len).all()
    fresh = completion_logps(model, torch.cat([ids, out.tokens], 1), torch.cat([mask, out.mask], 1),
                             out.tokens.shape[1], 2.0)
    torch.testing.assert_close(fresh * out.mask, out.logps, atol=1e-5, rtol=1e-4)


def test_decoding_choice_and_its_errors(model):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_decoding("auto", model, cpu, synced_processes=False) == "dynamic"
    assert resolve_decoding("auto", model, cuda, synced_processes=False) == "graph"
    assert resolve_decoding("auto", model, cuda, synced_processes=True) == "dynamic"  # ZeRO-3 lockstep
    with pytest.raises(ValueError, match="needs a CUDA device"):
        resolve_decoding("graph", model, cpu, synced_processes=False)
    with pytest.raises(ValueError, match="cannot keep step with other processes"):
        resolve_decoding("static", model, cpu, synced_processes=True)
    with pytest.raises(ValueError, match="decoding must be one of"):
        resolve_decoding("fast", model, cpu, synced_processes=False)
    model.config._attn_implementation = "flash_attention_2"
    try:
        assert resolve_decoding("auto", model, cuda, synced_processes=False) == "dynamic"
        with pytest.raises(ValueError, match="4D mask"):
            run(model, "static")
    finally:
        model.config._attn_implementation = "sdpa"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_graphed_decoding_matches_eager_on_cuda():
    model = build_toy_model(ToyConfig(seed=3)).cuda().eval()
    ids, mask, max_len, min_len = (t.cuda() for t in prompts())
    runs = {}
    for decoding, compact in (("dynamic", False), ("graph", False), ("graph", True)):
        torch.manual_seed(1)
        runs[decoding, compact] = sample(model, ids, mask, max_new_tokens=max_len, min_new_tokens=min_len,
                                         stop_token_id=STOP, pad_token_id=PAD, temperature=3.0, decoding=decoding,
                                         compact_finished=compact)
    eager, graphed = runs["dynamic", False], runs["graph", False]
    assert torch.equal(graphed.tokens, eager.tokens) and torch.equal(graphed.mask, eager.mask)
    torch.testing.assert_close(graphed.logps, eager.logps, atol=1e-4, rtol=1e-4)
    compacted = runs["graph", True]  # other random numbers once rows drop out, same bounds and log-probs
    fresh = completion_logps(model, torch.cat([ids, compacted.tokens], 1), torch.cat([mask, compacted.mask], 1),
                             compacted.tokens.shape[1], 3.0)
    torch.testing.assert_close(fresh * compacted.mask, compacted.logps, atol=1e-4, rtol=1e-4)
