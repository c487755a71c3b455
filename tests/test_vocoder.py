"""Vocoders: HiFT's released layout loads (legacy weight-norm names included), 480 samples per frame, bounded
output; the vocoder is chosen as the release chooses it; the tiny Vocos2D runs behind the released interface."""

import shutil

import pytest
import torch

from vocalign.policies.checkpoints import write_tiny_checkpoint
from vocalign.policies.codec import checkpoint_sample_rate, load_vocoder
from vocalign.policies.vocoder import HiFT, HiFTConfig
from vocalign.policies.vocos2d import Vocos2DTorchScript


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("ckpt"))


def test_tiny_hift_loads_and_makes_24k_audio(ckpt):
    hift = HiFT.from_pretrained(ckpt / "hift")
    torch.manual_seed(0)
    audio = hift(torch.randn(2, 80, 25) - 5)
    assert audio.shape == (2, 25 * 480) and audio.abs().max() <= 0.99 and torch.isfinite(audio).all()


def test_legacy_weight_norm_names_load(ckpt, tmp_path):
    """Checkpoints saved with torch.nn.utils.weight_norm name the parts weight_g / weight_v."""
    hift = HiFT.from_pretrained(ckpt / "hift")
    legacy = {}
    for key, value in hift.state_dict().items():
        key = key.replace("parametrizations.weight.original0", "weight_g").replace(
            "parametrizations.weight.original1", "weight_v")
        legacy[key] = value
    folder = tmp_path / "hift"
    folder.mkdir()
    (folder / "config.yaml").write_text((ckpt / "hift" / "config.yaml").read_text())
    torch.save(legacy, folder / "hift.pt")
    reloaded = HiFT.from_pretrained(folder)
    for (k, a), b in zip(hift.state_dict().items(), reloaded.state_dict().values()):
        torch.testing.assert_close(a, b, msg=k)


def test_default_sizes_are_cosyvoice2_and_missing_keys_are_named(tmp_path):
    cfg = HiFTConfig()
    assert cfg.samples_per_frame == 480 and cfg.sampling_rate == 24000
    small = HiFT(HiFTConfig(base_channels=64, f0_channels=16))
    state = small.state_dict()
    state.pop("f0_predictor.classifier.weight")
    (tmp_path / "config.yaml").write_text("base_channels: 64\nf0_channels: 16\n")
    torch.save(state, tmp_path / "hift.pt")
    with pytest.raises(ValueError, match=r"hift\.pt does not match the model: missing keys \['f0_predictor\.classifier\.weight'\]"):
        HiFT.from_pretrained(tmp_path)


def test_vocos2d_architecture_shapes_and_gradients():
    from vocalign.policies.vocos2d import Vocos2D, Vocos2DConfig

    model = Vocos2D(Vocos2DConfig(channels=8, depth=2, n_fft=256, hop=64))
    mel = torch.randn(2, 80, 12, requires_grad=True)
    audio = model(mel)
    assert audio.shape == (2, 12 * 64) and torch.isfinite(audio).all()
    audio.abs().mean().backward()
    # every block sees the input mel through its shortcut, and every frequency has its own embedding
    assert model.blocks[0].mel_shortcut.weight.grad is not None and model.freq_embedding.grad.abs().sum() > 0
    assert mel.grad.abs().sum() > 0


def test_vocos2d_torchscript_loader_feeds_offset_time_major_mel(tmp_path):
    from vocalign.policies.vocos2d import MEL_LOGDIFF, Vocos2DTorchScript

    class RecordingGenerator(torch.nn.Module):
        """Test double for the released generator: returns the mean of what it was given, per frame."""

        def forward(self, x):
            return x.mean(-1)

    torch.jit.script(RecordingGenerator()).save(str(tmp_path / "generator_jit.ckpt"))
    vocoder = Vocos2DTorchScript(tmp_path / "generator_jit.ckpt")
    mel = torch.zeros(1, 80, 5)
    torch.testing.assert_close(vocoder(mel), torch.full((1, 5), MEL_LOGDIFF))
    assert vocoder(torch.zeros(1, 80, 1)).shape == (1, 2)


def test_batched_vocoding_matches_one_at_a_time_but_for_the_padded_tail():
    # without excitation noise (nsf_alpha = nsf_sigma = 0) HiFT is deterministic, so rows can be compared
    torch.manual_seed(0)
    hift = HiFT(HiFTConfig(base_channels=32, f0_channels=16, nsf_alpha=0.0, nsf_sigma=0.0)).eval()
    mels = [torch.randn(80, n) - 5 for n in (40, 25, 33)]
    batched = hift.batch(mels)
    assert [len(a) for a in batched] == [n * 480 for n in (40, 25, 33)]
    tail = 10 * 480  # the vocoder's receptive field reaches about 8 frames (0.17 s) back from the padding
    for mel, audio in zip(mels, batched):
        alone = hift(mel[None])[0]
        torch.testing.assert_close(audio[:-tail], alone[:-tail], atol=1e-5, rtol=1e-4)
    assert hift.batch([]) == []


def test_the_vocoder_is_chosen_as_released_and_missing_files_are_named(ckpt, tmp_path):
    assert checkpoint_sample_rate(ckpt) == 24000  # HiFT first, the release's default
    assert checkpoint_sample_rate(ckpt, 32000) == 32000
    only_vocos = tmp_path / "only_vocos"
    shutil.copytree(ckpt, only_vocos, ignore=shutil.ignore_patterns("hift"))
    assert checkpoint_sample_rate(only_vocos) == 32000
    with pytest.raises(FileNotFoundError, match=r"24000 Hz output needs .*hift/hift\.pt, which is missing; this "
                                                r"checkpoint has 32000 \(vocos2d/generator_jit\.ckpt\)"):
        checkpoint_sample_rate(only_vocos, 24000)
    (only_vocos / "vocos2d" / "generator_jit.ckpt").unlink()
    with pytest.raises(FileNotFoundError, match="has no vocoder: expected hift/hift.pt or vocos2d/generator_jit.ckpt"):
        checkpoint_sample_rate(only_vocos)
    with pytest.raises(ValueError, match=r"sample_rate 22050 is not one of the released vocoders' rates"):
        checkpoint_sample_rate(ckpt, 22050)


def test_tiny_vocos2d_has_the_released_generators_interface(ckpt):
    vocoder = load_vocoder(ckpt, 32000)
    assert isinstance(vocoder, Vocos2DTorchScript) and vocoder.sample_rate == 32000
    torch.manual_seed(0)
    mel = torch.randn(80, 25) - 5
    audio = vocoder(mel[None])[0]
    assert audio.shape == (25 * 640,) and torch.isfinite(audio).all()
    # the wrapper adds the release's offset and the scripted generator takes it off again: our mel reaches Vocos2D
    torch.testing.assert_close(audio, vocoder.model.generator(mel[None])[0])
    short, long = vocoder.batch([mel[:, :7], mel])
    torch.testing.assert_close(short, vocoder(mel[None, :, :7])[0])
    torch.testing.assert_close(long, audio)
