"""Real speech for tests: espeak-ng (a Debian package the test command installs) speaking to memory."""

import io
import shutil
import subprocess

import numpy as np
import pytest
import soundfile as sf

needs_espeak = pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng is not installed")


def speak(text: str, voice: str = "en-us", speed: int = 120) -> tuple[np.ndarray, int]:
    wav = subprocess.run(["espeak-ng", "-v", voice, "-s", str(speed), "--stdout", text],
                         check=True, capture_output=True).stdout
    audio, rate = sf.read(io.BytesIO(wav), dtype="float32")
    return audio, rate
