"""Audio checks and resampling shared by reward models (they all want 16 kHz mono float32)."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
from scipy.signal import resample_poly

MODEL_RATE = 16000


class BadAudioError(ValueError):
    """An utterance that cannot be scored; the message says which and why."""


def check_audio(audio: np.ndarray, sample_rate: int, *, what: str = "audio", max_seconds: float = 60.0,
                allowed_rates: tuple[int, ...] = (8000, 16000, 22050, 24000, 32000, 44100, 48000)) -> np.ndarray:
    """Return ``audio`` as a 1-D float32 array or raise :class:`BadAudioError` saying what is wrong."""
    audio = np.asarray(audio)
    if audio.ndim != 1:
        raise BadAudioError(f"{what} must be mono (1-D), got shape {audio.shape}")
    if audio.size == 0:
        raise BadAudioError(f"{what} is empty")
    if sample_rate not in allowed_rates:
        raise BadAudioError(f"{what} has sample rate {sample_rate}; expected one of {allowed_rates}")
    if not np.isfinite(audio).all():
        raise BadAudioError(f"{what} contains NaN or inf samples")
    seconds = audio.size / sample_rate
    if seconds > max_seconds:
        raise BadAudioError(f"{what} is {seconds:.1f} s long; the limit is {max_seconds:.0f} s")
    return audio.astype(np.float32, copy=False)


def to_model_rate(audio: np.ndarray, sample_rate: int, target: int = MODEL_RATE) -> np.ndarray:
    """Polyphase resampling to ``target`` Hz (exact rational ratio, no torchaudio needed)."""
    if sample_rate == target:
        return audio.astype(np.float32, copy=False)
    ratio = Fraction(target, sample_rate)
    return resample_poly(audio, ratio.numerator, ratio.denominator).astype(np.float32)
