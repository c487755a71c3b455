"""Stage 2b of GLM-TTS: mel -> 24 kHz waveform with HiFT (neural source-filter + iSTFT, CosyVoice 2 parameters).

An F0 predictor reads the mel; a harmonic source (sines at F0 and 8 overtones, noise where unvoiced) is built at
the audio rate, analysed by a 16-point STFT and fused into a HiFi-GAN-style upsampler (8 x 5 x 3 = 120) whose
output is a magnitude and phase spectrum inverted by iSTFT (hop 4): 480 samples per mel frame. Modules carry the
names of the released ``hift/hift.pt`` so it loads by name.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from torch import nn
from torch.nn.utils.parametrizations import weight_norm

from ..common.weights import load_torch_state


@dataclass(frozen=True)
class HiFTConfig:
    in_channels: int = 80
    base_channels: int = 512
    nb_harmonics: int = 8
    sampling_rate: int = 24000
    nsf_alpha: float = 0.1
    nsf_sigma: float = 0.003
    nsf_voiced_threshold: float = 10.0
    upsample_rates: tuple[int, ...] = (8, 5, 3)
    upsample_kernel_sizes: tuple[int, ...] = (16, 11, 7)
    n_fft: int = 16
    hop_len: int = 4
    resblock_kernel_sizes: tuple[int, ...] = (3, 7, 11)
    resblock_dilation_sizes: tuple[tuple[int, ...], ...] = ((1, 3, 5), (1, 3, 5), (1, 3, 5))
    source_resblock_kernel_sizes: tuple[int, ...] = (7, 7, 11)
    source_resblock_dilation_sizes: tuple[tuple[int, ...], ...] = field(
        default=((1, 3, 5), (1, 3, 5), (1, 3, 5)))
    lrelu_slope: float = 0.1
    audio_limit: float = 0.99
    f0_channels: int = 512

    @property
    def samples_per_frame(self) -> int:
        return int(np.prod(self.upsample_rates)) * self.hop_len


class Snake(nn.Module):
    """x + sin^2(a x) / a, with a learned per channel."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.alpha = nn.Parameter(torch.ones(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        alpha = self.alpha[None, :, None]
        return x + (1.0 / (alpha + 1e-9)) * torch.sin(x * alpha).pow(2)


class ResBlock(nn.Module):
    def __init__(self, channels: int, kernel: int, dilations: Sequence[int]) -> None:
        super().__init__()
        self.convs1 = nn.ModuleList(weight_norm(nn.Conv1d(channels, channels, kernel, dilation=d,
                                                          padding=(kernel * d - d) // 2)) for d in dilations)
        self.convs2 = nn.ModuleList(weight_norm(nn.Conv1d(channels, channels, kernel, padding=(kernel - 1) // 2))
                                    for _ in dilations)
        self.activations1 = nn.ModuleList(Snake(channels) for _ in dilations)
        self.activations2 = nn.ModuleList(Snake(channels) for _ in dilations)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for c1, c2, a1, a2 in zip(self.convs1, self.convs2, self.activations1, self.activations2):
            x = x + c2(a2(c1(a1(x))))
        return x


class F0Predictor(nn.Module):
    """Five weight-normed convolutions with ELU, then a linear read-out of |F0| per frame."""

    def __init__(self, in_channels: int, channels: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for i in range(5):
            layers += [weight_norm(nn.Conv1d(in_channels if i == 0 else channels, channels, 3, padding=1)), nn.ELU()]
        self.condnet = nn.Sequential(*layers)
        self.classifier = nn.Linear(channels, 1)

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        return torch.abs(self.classifier(self.condnet(mel).transpose(1, 2)).squeeze(-1))


class HarmonicSource(nn.Module):
    """Sines at F0 x (1 .. harmonics + 1) with random initial phase, zero where unvoiced, plus noise, merged by a
    linear layer and tanh. The phase is integrated at frame rate and interpolated, as in CosyVoice 2."""

    def __init__(self, cfg: HiFTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.l_linear = nn.Linear(cfg.nb_harmonics + 1, 1)

    def forward(self, f0: torch.Tensor) -> torch.Tensor:
        """``f0`` ``[B, samples, 1]`` -> excitation ``[B, samples, 1]``."""
        cfg, scale = self.cfg, self.cfg.samples_per_frame
        with torch.no_grad():
            harmonics = f0 * torch.arange(1, cfg.nb_harmonics + 2, device=f0.device, dtype=f0.dtype)
            rad = (harmonics / cfg.sampling_rate) % 1
            initial = torch.rand(harmonics.shape[0], harmonics.shape[2], device=f0.device)
            initial[:, 0] = 0
            rad[:, 0, :] = rad[:, 0, :] + initial
            rad = F.interpolate(rad.transpose(1, 2), scale_factor=1 / scale, mode="linear").transpose(1, 2)
            phase = torch.cumsum(rad, dim=1) * 2 * np.pi
            phase = F.interpolate(phase.transpose(1, 2) * scale, scale_factor=scale, mode="linear").transpose(1, 2)
            sines = torch.sin(phase) * cfg.nsf_alpha
            voiced = (f0 > cfg.nsf_voiced_threshold).float()
            noise_amp = voiced * cfg.nsf_sigma + (1 - voiced) * cfg.nsf_alpha / 3
            sines = sines * voiced + noise_amp * torch.randn_like(sines)
            # the release also draws a noise branch that inference never uses; drawing as much keeps a seeded run in
            # step with the release's, where HiFT's draws fall between the flow's (streaming)
            torch.randn_like(voiced)
        return torch.tanh(self.l_linear(sines))


class HiFT(nn.Module):
    def __init__(self, cfg: HiFTConfig = HiFTConfig()) -> None:
        super().__init__()
        self.cfg = cfg
        self.sample_rate = cfg.sampling_rate
        base, n_spec = cfg.base_channels, cfg.n_fft + 2
        self.m_source = HarmonicSource(cfg)
        self.conv_pre = weight_norm(nn.Conv1d(cfg.in_channels, base, 7, padding=3))
        self.ups = nn.ModuleList(
            weight_norm(nn.ConvTranspose1d(base // 2**i, base // 2 ** (i + 1), k, u, padding=(k - u) // 2))
            for i, (u, k) in enumerate(zip(cfg.upsample_rates, cfg.upsample_kernel_sizes)))
        down = np.cumprod([1, *cfg.upsample_rates[::-1][:-1]])[::-1]
        self.source_downs = nn.ModuleList(
            nn.Conv1d(n_spec, base // 2 ** (i + 1), 1) if u == 1 else
            nn.Conv1d(n_spec, base // 2 ** (i + 1), int(u) * 2, int(u), padding=int(u) // 2)
            for i, u in enumerate(down))
        self.source_resblocks = nn.ModuleList(
            ResBlock(base // 2 ** (i + 1), k, d)
            for i, (k, d) in enumerate(zip(cfg.source_resblock_kernel_sizes, cfg.source_resblock_dilation_sizes)))
        self.resblocks = nn.ModuleList(
            ResBlock(base // 2 ** (i + 1), k, d)
            for i in range(len(cfg.upsample_rates))
            for k, d in zip(cfg.resblock_kernel_sizes, cfg.resblock_dilation_sizes))
        self.conv_post = weight_norm(nn.Conv1d(base // 2 ** len(cfg.upsample_rates), n_spec, 7, padding=3))
        self.f0_predictor = F0Predictor(cfg.in_channels, cfg.f0_channels)
        self.register_buffer("window", torch.hann_window(cfg.n_fft, periodic=True), persistent=False)

    @classmethod
    def from_pretrained(cls, folder: str | Path, device: str = "cpu") -> HiFT:
        """``hift/hift.pt``; sizes are CosyVoice 2's unless ``hift/config.yaml`` overrides some of them."""
        folder = Path(folder)
        overrides = yaml.safe_load((folder / "config.yaml").read_text()) if (folder / "config.yaml").is_file() else {}
        unknown = sorted(set(overrides or {}) - {f.name for f in fields(HiFTConfig)})
        if unknown:
            raise ValueError(f"{folder / 'config.yaml'}: unknown HiFT settings {unknown}")
        model = cls(HiFTConfig(**(overrides or {})))
        load_torch_state(model, folder / "hift.pt")
        return model.to(device).eval()

    def _decode(self, mel: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        spec = torch.view_as_real(torch.stft(source.squeeze(1), cfg.n_fft, cfg.hop_len, cfg.n_fft,
                                             window=self.window, return_complex=True))
        s = torch.cat([spec[..., 0], spec[..., 1]], dim=1)
        x = self.conv_pre(mel)
        kernels = len(cfg.resblock_kernel_sizes)
        for i, up in enumerate(self.ups):
            x = up(F.leaky_relu(x, cfg.lrelu_slope))
            if i == len(self.ups) - 1:
                x = F.pad(x, (1, 0), mode="reflect")
            x = x + self.source_resblocks[i](self.source_downs[i](s))
            x = sum(self.resblocks[i * kernels + j](x) for j in range(kernels)) / kernels
        x = self.conv_post(F.leaky_relu(x))
        half = cfg.n_fft // 2 + 1
        magnitude = torch.exp(x[:, :half]).clip(max=1e2)
        phase = torch.sin(x[:, half:])
        audio = torch.istft(torch.complex(magnitude * torch.cos(phase), magnitude * torch.sin(phase)), cfg.n_fft,
                            cfg.hop_len, cfg.n_fft, window=self.window)
        return audio.clamp(-cfg.audio_limit, cfg.audio_limit)

    @torch.inference_mode()
    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        """``[B, 80, frames]`` log-mel -> ``[B, frames * 480]`` audio in [-0.99, 0.99]."""
        f0 = self.f0_predictor(mel)
        f0 = F.interpolate(f0[:, None], scale_factor=self.cfg.samples_per_frame, mode="nearest").transpose(1, 2)
        source = self.m_source(f0).transpose(1, 2)
        return self._decode(mel, source)

    def batch(self, mels: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Audio of mels of different lengths (``[80, frames]`` each) in one batched call: padded with the quietest
        frame of the batch, each row cut back to ``frames * 480`` samples."""
        if not mels:
            return []
        frames = [mel.shape[-1] for mel in mels]
        silence = min(float(mel.min()) for mel in mels)
        padded = torch.full((len(mels), mels[0].shape[0], max(frames)), silence, device=mels[0].device)
        for row, mel in enumerate(mels):
            padded[row, :, :mel.shape[-1]] = mel
        audio = self(padded)
        return [audio[row, :n * self.cfg.samples_per_frame] for row, n in enumerate(frames)]
