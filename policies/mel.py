"""The log-mel front end the flow model was trained on (HiFi-GAN style, as published).

24 kHz: n_fft = win = 1920, hop 480 (50 frames/s); 32 kHz: n_fft = win = 2560, hop 640. 80 Slaney mel bands from
0 to 8 kHz, magnitude (not power), no centring but reflect padding of (n_fft - hop) / 2 each side, log(max(x, 1e-5)).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class MelConfig:
    sample_rate: int = 24000
    n_fft: int = 1920
    hop: int = 480
    n_mels: int = 80
    fmin: float = 0.0
    fmax: float = 8000.0


MEL_24K = MelConfig()
MEL_32K = MelConfig(sample_rate=32000, n_fft=2560, hop=640)


@lru_cache(maxsize=8)
def _filters(cfg: MelConfig) -> torch.Tensor:
    import librosa

    return torch.from_numpy(librosa.filters.mel(sr=cfg.sample_rate, n_fft=cfg.n_fft, n_mels=cfg.n_mels,
                                                fmin=cfg.fmin, fmax=cfg.fmax)).float()


def log_mel(wav: torch.Tensor, cfg: MelConfig = MEL_24K) -> torch.Tensor:
    """``[B, samples]`` (or ``[samples]``) float audio at ``cfg.sample_rate`` -> ``[B, n_mels, frames]``."""
    squeeze = wav.dim() == 1
    wav = wav.unsqueeze(0) if squeeze else wav
    pad = (cfg.n_fft - cfg.hop) // 2
    wav = F.pad(wav.unsqueeze(1), (pad, pad), mode="reflect").squeeze(1)
    spec = torch.stft(wav, cfg.n_fft, hop_length=cfg.hop, win_length=cfg.n_fft,
                      window=torch.hann_window(cfg.n_fft, device=wav.device), center=False, return_complex=True)
    magnitude = torch.sqrt(spec.real.pow(2) + spec.imag.pow(2) + 1e-9)
    mel = torch.matmul(_filters(cfg).to(wav.device), magnitude)
    mel = torch.log(mel.clamp(min=1e-5))
    return mel[0] if squeeze else mel
