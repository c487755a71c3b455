"""Band-limited resampling that gives what the GLM-TTS release's torchaudio gives, with or without torchaudio.

The release resamples prompts with ``torchaudio.transforms.Resample`` at its defaults (Hann-windowed sinc, lowpass
width 6, rolloff 0.99). Other resamplers feed the speech tokenizer slightly different audio (scipy's polyphase filter
differs by up to 0.25 on white noise) and so flip some prompt speech tokens. torchaudio is used where it imports; on
machines where it does not (every Linux wheel is a CUDA build, which does not load beside CPU torch) the same kernel
is computed here with numpy. Neither torch nor torchaudio is imported until a resampling asks for it.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

LOWPASS_ZERO_CROSSINGS = 6  # torchaudio's lowpass_filter_width default
ROLLOFF = 0.99  # cutoff as a fraction of the lower rate's Nyquist frequency, torchaudio's default


def resample(audio: np.ndarray, orig_rate: int, new_rate: int) -> np.ndarray:
    """``audio`` (1-D) from ``orig_rate`` to ``new_rate`` Hz as float32, as torchaudio's default Resample does it."""
    audio = np.asarray(audio, dtype=np.float32)
    if orig_rate == new_rate:
        return audio
    torchaudio_resampler = _torchaudio_resampler(orig_rate, new_rate)
    if torchaudio_resampler is None:
        return sinc_resample(audio, orig_rate, new_rate)
    return torchaudio_resampler(audio)


def sinc_resample(audio: np.ndarray, orig_rate: int, new_rate: int) -> np.ndarray:
    """Windowed-sinc resampling with torchaudio's kernel, padding and output length, in numpy.

    Output sample ``j`` interpolates the input at time ``j / new_rate``. With the rates reduced by their gcd to
    ``orig:new``, output ``j + new`` uses the same filter taps as output ``j`` on the input shifted by ``orig``, so
    ``new`` filters applied at a stride of ``orig`` give every output sample.
    """
    audio = np.asarray(audio, dtype=np.float32)
    if audio.ndim != 1:
        raise ValueError(f"sinc_resample takes mono (1-D) audio, got shape {audio.shape}")
    orig, new = _reduced(orig_rate, new_rate)
    kernel, width = _sinc_kernel(orig_rate, new_rate)
    padded = np.pad(audio, (width, width + orig))
    frames = sliding_window_view(padded, kernel.shape[1])[::orig]
    resampled = (frames @ kernel.T).reshape(-1)
    return resampled[: math.ceil(new * audio.size / orig)]


def _reduced(orig_rate: int, new_rate: int) -> tuple[int, int]:
    if orig_rate <= 0 or new_rate <= 0 or int(orig_rate) != orig_rate or int(new_rate) != new_rate:
        raise ValueError(f"sample rates must be positive integers, got {orig_rate} and {new_rate}")
    gcd = math.gcd(int(orig_rate), int(new_rate))
    return int(orig_rate) // gcd, int(new_rate) // gcd


@functools.lru_cache(maxsize=16)
def _sinc_kernel(orig_rate: int, new_rate: int) -> tuple[np.ndarray, int]:
    """``new`` float32 filters of ``2 * width + orig`` taps each, and ``width``: the input samples each side of a
    stride that an output sample can see (``LOWPASS_ZERO_CROSSINGS`` zero crossings of the sinc)."""
    orig, new = _reduced(orig_rate, new_rate)
    cutoff = min(orig, new) * ROLLOFF
    width = math.ceil(LOWPASS_ZERO_CROSSINGS * orig / cutoff)
    tap_times = np.arange(-width, width + orig, dtype=np.float64) / orig
    # each output's phase -j/new is float32 in torchaudio (an integer range divided in the default dtype), the rest
    # float64 until the kernel is stored as float32 (transforms.Resample's default)
    output_phases = (np.arange(0, -new, -1, dtype=np.float32) / np.float32(new)).astype(np.float64)
    t = (output_phases[:, None] + tap_times[None, :]) * cutoff
    t = np.clip(t, -LOWPASS_ZERO_CROSSINGS, LOWPASS_ZERO_CROSSINGS)
    hann = np.cos(t * math.pi / LOWPASS_ZERO_CROSSINGS / 2) ** 2
    t *= math.pi
    with np.errstate(invalid="ignore", divide="ignore"):
        sinc = np.where(t == 0, 1.0, np.sin(t) / t)
    kernel = (sinc * hann * (cutoff / orig)).astype(np.float32)
    kernel.flags.writeable = False
    return kernel, width


@functools.lru_cache(maxsize=16)
def _torchaudio_resampler(orig_rate: int, new_rate: int) -> Callable[[np.ndarray], np.ndarray] | None:
    """torchaudio's own Resample for this pair of rates, or None where torchaudio is missing or does not load."""
    try:
        import torch
        import torchaudio
    except (ImportError, OSError):
        return None
    transform = torchaudio.transforms.Resample(orig_freq=orig_rate, new_freq=new_rate)

    def resample_with_torchaudio(audio: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return transform(torch.tensor(audio)[None])[0].numpy()

    return resample_with_torchaudio
