"""Audio as models are fed it, from disk and from callers, checked.

Reward plugins and the reward server check and resample audio here, the TTS models (``policies``) read their prompts
here, and so do evaluation, SFT and the rollout environment. Only numpy and soundfile are imported with it, so a
reward server whose plugin needs no torch does not load it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import soundfile as sf

from .resample import resample

MODEL_RATE = 16000  # what the reward models (ASR, speaker and emotion encoders) and the speech tokenizer take
ALLOWED_RATES = (8000, 16000, 22050, 24000, 32000, 44100, 48000)


class BadAudioError(ValueError):
    """An utterance that cannot be scored; the message says which and why."""


# ---------------------------------------------------------------------------------------------- audio files
def read_audio(path: str | Path) -> tuple[np.ndarray, int]:
    """A WAV/FLAC/OGG file as mono float32 (channels averaged) and its sample rate."""
    audio, rate = sf.read(str(path), dtype="float32", always_2d=True)
    return audio.mean(axis=1), rate


def check_audio_file(path: str | Path) -> None:
    """Raise a ValueError naming ``path`` and libsndfile's reason unless it is audio :func:`read_audio` can read.
    Reads the header only, so a prompt set can be checked when it is loaded rather than at its first use."""
    try:
        sf.info(str(path))
    except sf.SoundFileError as err:
        raise ValueError(f"{path} cannot be read as audio ({err})") from None


def write_audio(path: str | Path, audio: np.ndarray, sample_rate: int) -> None:
    """Mono audio to a file whose suffix names the format (``.wav``: 16-bit PCM)."""
    sf.write(str(path), audio, sample_rate)


def audio_writer(path: str | Path, sample_rate: int) -> sf.SoundFile:
    """A mono file open for writing piece by piece (streaming synthesis); use it as a context manager."""
    return sf.SoundFile(str(path), "w", samplerate=sample_rate, channels=1)


# ---------------------------------------------------------------------------------------------- audio arrays
def check_audio(audio: np.ndarray, sample_rate: int, *, what: str = "audio", max_seconds: float = 60.0) -> np.ndarray:
    """Return ``audio`` as a 1-D float32 array or raise :class:`BadAudioError` saying what is wrong."""
    audio = np.asarray(audio)
    if audio.ndim != 1:
        raise BadAudioError(f"{what} must be mono (1-D), got shape {audio.shape}")
    if audio.size == 0:
        raise BadAudioError(f"{what} is empty")
    if sample_rate not in ALLOWED_RATES:
        raise BadAudioError(f"{what} has sample rate {sample_rate}; expected one of {ALLOWED_RATES}")
    if not np.isfinite(audio).all():
        raise BadAudioError(f"{what} contains NaN or inf samples")
    seconds = audio.size / sample_rate
    if seconds > max_seconds:
        raise BadAudioError(f"{what} is {seconds:.1f} s long; the limit is {max_seconds:.0f} s")
    return audio.astype(np.float32, copy=False)


def to_model_rate(audio: np.ndarray, sample_rate: int, target: int = MODEL_RATE) -> np.ndarray:
    """``audio`` at ``target`` Hz as float32, resampled as the GLM-TTS release resamples prompts (torchaudio's
    Hann-windowed sinc, see :mod:`.resample`), so that speech tokens and features match the release's."""
    return resample(audio, sample_rate, target)
