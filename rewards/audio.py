"""What models are fed from disk and from callers, checked: audio files and arrays, and state dicts.

The one module every package uses for both: reward plugins and the reward server check and resample audio here, the
TTS models (``policies``) read their prompts and load their weights here, and so do evaluation, SFT and the rollout
environment. It imports nothing else of vocalign, so ``policies`` can use it without ``rewards`` ever importing
``policies``: the dependency between the two runs one way. Only numpy, scipy and soundfile are imported with it; torch
is imported when a state dict is read, so a reward server whose plugin needs no torch does not load it.

State dicts are loaded strictly: a missing, unexpected or misshapen key raises a ValueError naming the file and the
key, instead of leaving a layer at its random initial value, which is what a non-strict load silently does.
"""

from __future__ import annotations

from collections.abc import Mapping
from fractions import Fraction
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import soundfile as sf
from scipy.signal import resample_poly

if TYPE_CHECKING:
    import torch

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
    """Polyphase resampling to ``target`` Hz (exact rational ratio, no torchaudio needed)."""
    if sample_rate == target:
        return audio.astype(np.float32, copy=False)
    ratio = Fraction(target, sample_rate)
    return resample_poly(audio, ratio.numerator, ratio.denominator).astype(np.float32)


# ---------------------------------------------------------------------------------------------- state dicts
def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """``torch.load(weights_only=True)`` (never runs pickled code); unwraps ``{"model"|"state_dict": ...}`` and
    DataParallel's ``module.`` prefix."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    state = torch.load(path, map_location="cpu", weights_only=True)
    for wrapper in ("model", "state_dict"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    return {k.removeprefix("module."): v for k, v in state.items()}


def _modern_weight_norm_name(key: str, expected: Mapping[str, torch.Tensor]) -> str:
    """Checkpoints written with the old ``torch.nn.utils.weight_norm`` name its parts ``weight_g``/``weight_v``;
    the parametrized modules of current torch expect ``parametrizations.weight.original0``/``original1``."""
    for old, new in (("weight_g", "original0"), ("weight_v", "original1")):
        if key.endswith("." + old):
            modern = key[: -len(old)] + "parametrizations.weight." + new
            if modern in expected:
                return modern
    return key


def load_strict(module: torch.nn.Module, state: Mapping[str, torch.Tensor], source: str | Path) -> None:
    """Load ``state`` into ``module`` only if every key matches in name and shape; ``source`` names it on error."""
    expected = module.state_dict()
    state = {_modern_weight_norm_name(k, expected): v for k, v in state.items()}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{source} does not match the model: missing keys {missing[:5]}"
                         f"{' ...' if len(missing) > 5 else ''}, unexpected keys {unexpected[:5]}"
                         f"{' ...' if len(unexpected) > 5 else ''}")
    for key, value in state.items():
        if value.shape != expected[key].shape:
            raise ValueError(f"{source}: key {key!r} has shape {tuple(value.shape)}, the model expects "
                             f"{tuple(expected[key].shape)}")
    module.load_state_dict(state, strict=True)


def load_torch_state(module: torch.nn.Module, path: str | Path) -> None:
    """A ``.pt`` state dict file into ``module``, strictly."""
    load_strict(module, read_state_dict(path), path)
