"""Resampling as the GLM-TTS release's torchaudio does it: fixtures made with torchaudio (fixtures/resample/README.md)."""

import subprocess
import sys

import numpy as np
import pytest

from vocalign.common.audio import to_model_rate
from vocalign.common.resample import sinc_resample

from .conftest import REPO

FIXTURES = np.load(REPO / "tests" / "fixtures" / "resample" / "resample.npz")
CASES = sorted({name.split(".")[0] for name in FIXTURES.files if name.endswith(".output")})


def case(name: str) -> tuple[np.ndarray, int, int, np.ndarray]:
    rate_in, rate_out = (int(rate) for rate in FIXTURES[f"{name}.rates"])
    return FIXTURES[f"{name}.input"], rate_in, rate_out, FIXTURES[f"{name}.output"]


def test_fixtures_cover_the_rates_the_models_meet():
    assert len(CASES) == 6  # an empty set would silently parametrize nothing


@pytest.mark.parametrize("name", CASES)
def test_numpy_kernel_matches_torchaudio_sample_for_sample(name):
    audio, rate_in, rate_out, expected = case(name)
    resampled = sinc_resample(audio, rate_in, rate_out)
    assert resampled.dtype == np.float32 and resampled.shape == expected.shape
    np.testing.assert_allclose(resampled, expected, atol=1e-5, rtol=0)  # measured at most 1.2e-7


@pytest.mark.parametrize("name", CASES)
def test_to_model_rate_matches_torchaudio(name):
    audio, rate_in, rate_out, expected = case(name)  # torchaudio itself where it imports, else the numpy kernel
    resampled = to_model_rate(audio, rate_in, rate_out)
    assert resampled.dtype == np.float32 and resampled.shape == expected.shape
    np.testing.assert_allclose(resampled, expected, atol=1e-5, rtol=0)


def test_same_rate_is_returned_as_float32_and_bad_input_is_refused():
    audio = np.linspace(-1, 1, 100)
    np.testing.assert_array_equal(to_model_rate(audio, 16000), audio.astype(np.float32))
    with pytest.raises(ValueError, match=r"mono \(1-D\) audio, got shape \(2, 50\)"):
        sinc_resample(audio.reshape(2, 50), 24000, 16000)
    with pytest.raises(ValueError, match="positive integers, got 22050.5 and 16000"):
        sinc_resample(audio, 22050.5, 16000)


def test_importing_the_audio_module_does_not_load_torch():
    """A reward server whose plugin needs no torch imports common.audio; torch is only loaded if torchaudio is."""
    code = "import sys, vocalign.common.audio; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "False\n"
