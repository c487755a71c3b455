"""Speech units that need no neural decoder: k-means codes of log-mel frames, decoded by Griffin-Lim.

The demo TTS that vocalign trains on a CPU (see :mod:`vocalign.demo.build`) needs a speech tokenizer and a
token-to-audio stage it can build in seconds, where GLM-TTS has a Whisper-VQ tokenizer, a flow-matching model and a
vocoder. A code stands for two consecutive 50 Hz log-mel frames (16 kHz, hop 320), so codes come at 25 Hz like
GLM-TTS's speech tokens, each covering two mel frames as the flow model's do. Codes are the nearest of
``num_codes`` k-means centroids; decoding looks up each code's centroid, maps it to a linear magnitude spectrum
(non-negative least squares, precomputed per centroid) and recovers phase with Griffin-Lim. Centroids are fitted on
many voices, so a code carries timbre as well as phone: the speech LM must continue in the voice prompt's codes to
keep the voice, which is what makes a speaker-similarity reward meaningful for it.

Measured on held-out espeak-ng voices (pocketsphinx with a digit grammar): the round trip keeps the recogniser's
word error rate at the level of the original audio once the centroids are fitted on a few hundred utterances.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import load_file, save_file

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "centroids.safetensors"


@dataclass(frozen=True)
class MelUnitsConfig:
    sample_rate: int = 16000  # Hz of the audio it encodes and decodes
    n_fft: int = 1024  # STFT window, samples
    hop: int = 320  # STFT hop, samples (320 at 16 kHz: 50 Hz frames)
    n_mels: int = 80  # mel bands per frame
    frames_per_code: int = 2  # 50 Hz frames -> 25 Hz codes
    num_codes: int = 512  # k-means centroids: the speech-token vocabulary
    griffin_lim_iters: int = 32  # Griffin-Lim phase-recovery iterations per decode (more: slower)

    @property
    def code_rate(self) -> float:
        return self.sample_rate / (self.hop * self.frames_per_code)


class MelUnits:
    """Encoder (audio -> codes) and decoder (codes -> audio) of k-means mel units."""

    def __init__(self, cfg: MelUnitsConfig, centroids: np.ndarray) -> None:
        expected = (cfg.num_codes, cfg.frames_per_code * cfg.n_mels)
        if centroids.shape != expected:
            raise ValueError(f"mel-unit centroids have shape {centroids.shape}; the config asks for {expected}")
        self.cfg = cfg
        self.centroids = centroids.astype(np.float32)
        self._magnitudes: torch.Tensor | None = None
        self._phase_table: torch.Tensor | None = None

    # ------------------------------------------------------------------ analysis
    def log_mel(self, audio: np.ndarray) -> np.ndarray:
        """``[frames, n_mels]`` natural-log magnitude mel spectrogram of audio at ``cfg.sample_rate``."""
        import librosa

        cfg = self.cfg
        mel = librosa.feature.melspectrogram(y=np.asarray(audio, dtype=np.float32), sr=cfg.sample_rate,
                                             n_fft=cfg.n_fft, hop_length=cfg.hop, n_mels=cfg.n_mels, power=1.0)
        return np.log(mel + 1e-5).T.astype(np.float32)

    def code_features(self, audio: np.ndarray) -> np.ndarray:
        """``[codes, frames_per_code * n_mels]``: consecutive frames stacked, a trailing odd frame dropped."""
        frames = self.log_mel(audio)
        k = self.cfg.frames_per_code
        usable = len(frames) // k * k
        return frames[:usable].reshape(usable // k, k * self.cfg.n_mels)

    @classmethod
    def fit(cls, audios: Sequence[np.ndarray], cfg: MelUnitsConfig = MelUnitsConfig(), seed: int = 0) -> MelUnits:
        """k-means (scikit-learn's mini-batch k-means, three restarts) over every code-sized stack of frames."""
        from sklearn.cluster import MiniBatchKMeans

        probe = cls(cfg, np.zeros((cfg.num_codes, cfg.frames_per_code * cfg.n_mels), np.float32))
        features = np.concatenate([probe.code_features(a) for a in audios])
        if len(features) < cfg.num_codes:
            raise ValueError(f"{len(features)} code frames cannot fit {cfg.num_codes} centroids; give more audio")
        kmeans = MiniBatchKMeans(cfg.num_codes, random_state=seed, n_init=3, batch_size=4096).fit(features)
        return cls(cfg, kmeans.cluster_centers_)

    def encode(self, audio: np.ndarray) -> list[int]:
        """Nearest centroid (squared L2) of each code-sized stack of frames."""
        features = torch.from_numpy(self.code_features(audio))
        if len(features) == 0:
            return []
        return torch.cdist(features, torch.from_numpy(self.centroids)).argmin(-1).tolist()

    # ------------------------------------------------------------------ synthesis
    @property
    def magnitudes(self) -> torch.Tensor:
        """``[1 + n_fft / 2, num_codes * frames_per_code]`` linear magnitudes of every centroid frame, computed once
        (the least-squares mel inversion is the slow part of decoding, and centroids do not change)."""
        if self._magnitudes is None:
            import librosa

            cfg = self.cfg
            mel = np.exp(self.centroids.reshape(-1, cfg.n_mels)).T
            self._magnitudes = torch.from_numpy(librosa.feature.inverse.mel_to_stft(
                mel, sr=cfg.sample_rate, n_fft=cfg.n_fft, power=1.0).astype(np.float32))
        return self._magnitudes

    @torch.no_grad()
    def decode(self, codes: Sequence[int]) -> np.ndarray:
        """Audio at ``cfg.sample_rate``, ``hop * frames_per_code`` samples per code. Griffin-Lim starts from a fixed
        random phase table indexed by frame, so the same codes always give the same audio (a reward is a function
        of the codes)."""
        cfg = self.cfg
        codes = np.asarray(codes, dtype=np.int64)
        if codes.size == 0:
            return np.zeros(0, dtype=np.float32)
        if codes.min() < 0 or codes.max() >= cfg.num_codes:
            raise ValueError(f"mel-unit codes must lie in 0..{cfg.num_codes - 1}")
        columns = torch.from_numpy((codes[:, None] * cfg.frames_per_code + np.arange(cfg.frames_per_code)).reshape(-1))
        audio = griffin_lim(self.magnitudes[:, columns], cfg.n_fft, cfg.hop, cfg.griffin_lim_iters,
                            self._phase(len(columns)))
        # centred frames: n frames span (n - 1) hops; the last hop is padded so that duration = codes / code_rate
        return np.pad(audio.numpy(), (0, cfg.hop)).astype(np.float32)

    def decode_batch(self, batch: Sequence[Sequence[int]]) -> list[np.ndarray]:
        """One utterance at a time: on a CPU that is faster than a padded batch (the FFTs are the cost, and padding
        adds FFTs), and it keeps each utterance's audio independent of its batch."""
        return [self.decode(codes) for codes in batch]

    def _phase(self, frames: int) -> torch.Tensor:
        """``[1 + n_fft / 2, frames]`` unit phasors, the same for every call (seeded; drawn frame by frame, so a
        table grown for a longer utterance keeps the columns it had)."""
        if self._phase_table is None or self._phase_table.shape[1] < frames:
            generator = torch.Generator().manual_seed(0)
            angle = 2 * math.pi * torch.rand(max(frames, 1024), self.cfg.n_fft // 2 + 1, generator=generator).T
            self._phase_table = torch.polar(torch.ones_like(angle), angle)
        return self._phase_table[:, :frames]

    # ------------------------------------------------------------------ files
    def save(self, folder: str | Path) -> Path:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / CONFIG_FILE).write_text(json.dumps(asdict(self.cfg), indent=2) + "\n")
        save_file({"centroids": self.centroids}, str(folder / WEIGHTS_FILE))
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> MelUnits:
        folder = Path(folder)
        for name in (CONFIG_FILE, WEIGHTS_FILE):
            if not (folder / name).is_file():
                raise FileNotFoundError(f"{folder / name} is missing: not a mel-units folder")
        settings = json.loads((folder / CONFIG_FILE).read_text())
        unknown = sorted(set(settings) - set(MelUnitsConfig.__dataclass_fields__))
        if unknown:
            raise ValueError(f"{folder / CONFIG_FILE}: unknown setting(s) {unknown}")
        tensors = load_file(str(folder / WEIGHTS_FILE))
        if set(tensors) != {"centroids"}:
            raise ValueError(f"{folder / WEIGHTS_FILE} must hold exactly one tensor, 'centroids'; found {sorted(tensors)}")
        return cls(MelUnitsConfig(**settings), tensors["centroids"])


def griffin_lim(magnitude: torch.Tensor, n_fft: int, hop: int, iterations: int, phase: torch.Tensor,
                momentum: float = 0.99) -> torch.Tensor:
    """Fast Griffin-Lim (Perraudin et al. 2013, librosa's algorithm and defaults) on ``[F, T]`` magnitudes with
    Hann windows, starting from ``phase`` (``[F, T]`` unit phasors); returns ``(T - 1) * hop`` samples. torch's FFTs
    run it about four times faster than ``librosa.griffinlim`` here; torchaudio's ``GriffinLim`` would do as well,
    but torchaudio does not import beside the CPU torch wheels we use."""
    window = torch.hann_window(n_fft)
    length = (magnitude.shape[-1] - 1) * hop
    angles = phase.clone()
    rebuilt = torch.zeros_like(angles)
    for _ in range(iterations):
        previous = rebuilt
        audio = torch.istft(magnitude * angles, n_fft, hop, window=window, length=length)
        rebuilt = torch.stft(audio, n_fft, hop, window=window, pad_mode="constant", return_complex=True)
        angles = rebuilt - (momentum / (1 + momentum)) * previous
        angles = angles / (angles.abs() + 1e-16)
    return torch.istft(magnitude * angles, n_fft, hop, window=window, length=length)
