"""Vocos2D: the 32 kHz vocoder of the GLM-TTS report, and the loader of its released TorchScript generator.

The report describes a Vocos variant that convolves over (frequency, time) instead of treating mel bins as channels:
a point-wise input layer lifts each mel bin to C channels and adds a learned embedding per frequency, ConvNeXt
blocks with 2D depth-wise convolutions follow, and each block's inverted bottleneck also receives a projection of
the input mel (a shortcut that keeps fine spectral detail reachable at every depth). The head folds frequency into
channels and predicts an STFT (magnitude and phase) that is inverted. :class:`Vocos2D` implements that architecture
for training; the release ships only a TorchScript generator (``vocos2d/generator_jit.ckpt``), which
:class:`Vocos2DTorchScript` runs as published (it expects ``[B, T, 80]`` mel offset by ``MEL_LOGDIFF``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

MEL_LOGDIFF = -7.847762537473608  # added to our log-mel before the released generator


@dataclass(frozen=True)
class Vocos2DConfig:
    n_mels: int = 80
    channels: int = 32
    depth: int = 8
    expansion: int = 4
    kernel: int = 7
    n_fft: int = 2560
    hop: int = 640  # 32 kHz, 50 frames/s


class ConvNeXt2DBlock(nn.Module):
    def __init__(self, channels: int, expansion: int, kernel: int) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(channels, channels, kernel, padding=kernel // 2, groups=channels)
        self.norm = nn.GroupNorm(1, channels)
        self.expand = nn.Conv2d(channels, channels * expansion, 1)
        self.mel_shortcut = nn.Conv2d(1, channels * expansion, 1)
        self.project = nn.Conv2d(channels * expansion, channels, 1)
        self.gamma = nn.Parameter(torch.full((1, channels, 1, 1), 1e-6))

    def forward(self, x: torch.Tensor, mel: torch.Tensor) -> torch.Tensor:
        """``x`` ``[B, C, F, T]``; ``mel`` ``[B, 1, F, T]``."""
        h = self.expand(self.norm(self.dwconv(x))) + self.mel_shortcut(mel)
        return x + self.gamma * self.project(F.gelu(h))


class Vocos2D(nn.Module):
    def __init__(self, cfg: Vocos2DConfig = Vocos2DConfig()) -> None:
        super().__init__()
        self.cfg = cfg
        self.n_fft, self.hop = cfg.n_fft, cfg.hop  # plain ints, so that the model compiles to TorchScript
        self.input = nn.Conv2d(1, cfg.channels, 1)
        self.freq_embedding = nn.Parameter(torch.zeros(1, cfg.channels, cfg.n_mels, 1))
        self.blocks = nn.ModuleList(ConvNeXt2DBlock(cfg.channels, cfg.expansion, cfg.kernel) for _ in range(cfg.depth))
        self.norm = nn.GroupNorm(1, cfg.channels)
        self.head = nn.Conv1d(cfg.channels * cfg.n_mels, cfg.n_fft + 2, 1)
        self.register_buffer("window", torch.hann_window(cfg.n_fft), persistent=False)

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        """``[B, 80, T]`` log-mel -> ``[B, T * hop]`` audio."""
        m = mel.unsqueeze(1)
        x = self.input(m) + self.freq_embedding
        for block in self.blocks:
            x = block(x, m)
        x = self.norm(x)
        b, c, f, t = x.shape
        spec = self.head(x.reshape(b, c * f, t))
        half = self.n_fft // 2 + 1
        magnitude = torch.exp(spec[:, :half]).clamp(max=1e2)
        phase = spec[:, half:]
        stft = torch.polar(magnitude, phase)
        # centred frames, trimmed so that T frames give exactly T * hop samples
        audio = torch.istft(stft, self.n_fft, self.hop, window=self.window, center=True, length=t * self.hop)
        return audio


class ReleasedGeneratorInterface(nn.Module):
    """A :class:`Vocos2D` behind the released generator's interface (``[B, T, 80]`` mel offset by ``MEL_LOGDIFF``
    in, ``[B, samples]`` out), so that a model of ours, compiled to TorchScript, loads where the release's does (the
    tiny checkpoints' ``vocos2d/generator_jit.ckpt``)."""

    def __init__(self, generator: Vocos2D) -> None:
        super().__init__()
        self.generator = generator
        self.mel_offset = MEL_LOGDIFF

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        return self.generator((mel - self.mel_offset).transpose(1, 2))


class Vocos2DTorchScript:
    """The released generator: ``torch.jit.load`` of ``vocos2d/generator_jit.ckpt`` (TorchScript runs no pickled
    Python). Input: our ``[B, 80, T]`` log-mel at 32 kHz settings."""

    sample_rate = 32000

    def __init__(self, path: str | Path, device: str = "cpu") -> None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"Vocos2D generator {path} does not exist")
        self.model = torch.jit.load(str(path), map_location=device).eval()

    @torch.inference_mode()
    def __call__(self, mel: torch.Tensor) -> torch.Tensor:
        if mel.shape[-1] == 1:  # the released generator needs at least two frames
            mel = torch.cat([mel, mel], dim=-1)
        return self.model(mel.transpose(-1, -2) + MEL_LOGDIFF)

    def batch(self, mels: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Audio of mels of different lengths (``[80, frames]`` each), one call per mel: the generator's 2D
        convolutions would see a padded neighbour's frames, and its output length for padded input is not
        documented."""
        return [self(mel[None])[0] for mel in mels]
