"""Flow matching: the published layout loads strictly, batching changes nothing, the sampler integrates as stated."""

import pytest
import torch

from vocalign.policies.checkpoints import TinySizes, write_tiny_checkpoint
from vocalign.policies.flow import FlowConfig, FlowInput, FlowMatching, read_flow_config


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("ckpt"), TinySizes())


def items(n_new=(20, 7), n_prompt=(10, 5)):
    g = torch.Generator().manual_seed(0)
    return [FlowInput(torch.randint(0, 64, (a,), generator=g), torch.randint(0, 64, (b,), generator=g),
                      torch.randn(2 * b, 80, generator=g), torch.randn(192, generator=g))
            for a, b in zip(n_new, n_prompt)]


def test_loads_published_layout_and_drops_prompt_frames(ckpt):
    flow = FlowMatching.from_pretrained(ckpt / "flow")
    out = flow.generate(items(), steps=2)
    # 25 Hz tokens -> 50 mel frames/s; the prompt's frames are not returned
    assert [tuple(o.shape) for o in out] == [(80, 40), (80, 14)]
    assert all(torch.isfinite(o).all() for o in out)


def test_batched_equals_one_at_a_time(ckpt):
    flow = FlowMatching.from_pretrained(ckpt / "flow")
    batch = items()
    noise = [torch.randn(60, 80), torch.randn(24, 80)]
    together = flow.generate(batch, steps=3, noise=noise)
    alone = [flow.generate([it], steps=3, noise=[n])[0] for it, n in zip(batch, noise)]
    for a, b in zip(together, alone):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


class ConstantVelocityDouble(torch.nn.Module):
    """Test double for the DiT: velocity 1 with the condition, 3 without, to check Euler + CFG arithmetic."""

    def __init__(self):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # gives the flow a device

    def forward(self, x, cond, tokens, t, keep, spk, block_mask=None):
        conditional = (cond.abs().sum(dim=(1, 2)) > 0).float()[:, None, None]
        return conditional * torch.ones_like(x) + (1 - conditional) * 3 * torch.ones_like(x)


def test_euler_cosine_schedule_and_guidance_arithmetic():
    flow = FlowMatching(FlowConfig(vocab_size=8, speech_token_dim=8, trans_dim=32, depth=1, heads=1, dim_head=32,
                                   conv_layers=0))
    flow.estimator = ConstantVelocityDouble()
    it = FlowInput(torch.tensor([1, 2]), torch.tensor([3]), torch.ones(2, 80), torch.ones(192))
    out = flow.generate([it], steps=10, noise=[torch.zeros(6, 80)])[0]
    # v = 1.7 * 1 - 0.7 * 3 = -0.4 everywhere; the cosine schedule still spans t = 0 .. 1, so x(1) = -0.4
    torch.testing.assert_close(out, torch.full((80, 4), -0.4), atol=1e-5, rtol=0)


def test_missing_key_names_file_and_key(ckpt, tmp_path):
    import shutil

    broken = tmp_path / "flow"
    shutil.copytree(ckpt / "flow", broken)
    state = torch.load(broken / "flow.pt", weights_only=True)
    state.pop("estimator.proj_out.weight")
    torch.save({"model": state}, broken / "flow.pt")
    with pytest.raises(ValueError, match=r"flow\.pt does not match the model: missing keys \['estimator\.proj_out\.weight'\]"):
        FlowMatching.from_pretrained(broken)


def test_config_reads_hyperpyyaml_tags_and_rejects_unknown_keys(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text("flow: !new:flow.flow.Flow\n  vocab_size: 32\n  speech_token_dim: 16\n  loss_type: l2\n")
    cfg = read_flow_config(path)
    assert cfg.vocab_size == 32 and cfg.speech_token_dim == 16
    path.write_text("flow:\n  vocab_sise: 32\n")
    with pytest.raises(ValueError, match=r"unknown flow settings \['vocab_sise'\]"):
        read_flow_config(path)
    path.write_text("flow:\n  t_scheduler: quadratic\n")
    with pytest.raises(ValueError, match="t_scheduler must be 'cosine' or 'linear', got 'quadratic'"):
        read_flow_config(path)
