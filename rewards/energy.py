"""The energy reward: loudness of the utterance (GLM-TTS's recipe lists it beside pitch, with weight 0 by default).

It needs no model, so it is also what the server tests and benchmark run behind HTTP: its value is a known function
of the audio, which lets a test check every answer.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..common.audio import check_audio
from .base import RewardResult, Sample


def rms_dbfs(audio: np.ndarray) -> float:
    return float(20.0 * np.log10(max(float(np.sqrt(np.mean(np.square(audio, dtype=np.float64)))), 1e-10)))


class EnergyReward:
    """Reward 1 at ``target_dbfs``, falling linearly to 0 at ``tolerance_db`` away."""

    name = "energy"

    def __init__(self, target_dbfs: float = -20.0, tolerance_db: float = 20.0) -> None:
        if tolerance_db <= 0:
            raise ValueError(f"tolerance_db must be > 0, got {tolerance_db}")
        self.target, self.tolerance = target_dbfs, tolerance_db

    def score(self, samples: Sequence[Sample]) -> list[RewardResult]:
        results = []
        for i, s in enumerate(samples):
            level = rms_dbfs(check_audio(s.audio, s.sample_rate, what=f"sample {i}"))
            value = max(0.0, 1.0 - abs(level - self.target) / self.tolerance)
            results.append(RewardResult(value, {"rms_dbfs": level}))
        return results
