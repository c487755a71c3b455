"""The CER reward: transcribe, compare with the text, map the error rate to a reward.

GLM-TTS uses exp(-2.5 * CER), which keeps a useful slope near CER 0 where a well-trained model lives; a linear
1 - CER is offered for ablations. The transcript travels in ``info`` so the laughter reward can reuse it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from .asr import Transcriber, build_asr
from .audio import check_audio, to_model_rate
from .base import RewardResult, Sample
from .text_norm import error_rate


def cer_to_reward(cer: float, mapping: str = "exp", scale: float = 2.5) -> float:
    if mapping == "exp":
        return math.exp(-scale * cer)
    if mapping == "linear":
        return max(0.0, 1.0 - cer)
    raise ValueError(f"CER reward mapping must be 'exp' or 'linear', got {mapping!r}")


class CERReward:
    name = "cer"

    def __init__(self, asr: Mapping[str, Any] | None = None, mapping: str = "exp", scale: float = 2.5,
                 transcribers: Mapping[str, Transcriber] | None = None) -> None:
        """``asr`` maps a language to a backend spec, e.g. ``{"en": {"kind": "whisper", "model": "..."},
        "zh": {"kind": "paraformer", "model_dir": "..."}}``; default: pocketsphinx for English."""
        cer_to_reward(0.0, mapping, scale)  # validate early
        self.mapping, self.scale = mapping, scale
        if transcribers is not None:
            self.transcribers = dict(transcribers)
        else:
            specs = asr or {"en": {"kind": "pocketsphinx"}}
            self.transcribers = {lang: build_asr(**dict(spec)) for lang, spec in specs.items()}

    def score(self, samples: Sequence[Sample]) -> list[RewardResult]:
        results: list[RewardResult | None] = [None] * len(samples)
        by_language: dict[str, list[int]] = {}
        for i, s in enumerate(samples):
            by_language.setdefault(s.language, []).append(i)
        for language, indices in by_language.items():
            if language not in self.transcribers:
                raise ValueError(f"no ASR configured for language {language!r} (configured: "
                                 f"{sorted(self.transcribers)}); add it under the cer reward's `asr` setting")
            audios = [to_model_rate(check_audio(samples[i].audio, samples[i].sample_rate, what=f"sample {i}"),
                                    samples[i].sample_rate) for i in indices]
            texts = self.transcribers[language].transcribe(audios)
            for i, hyp in zip(indices, texts):
                rate = error_rate(samples[i].text, hyp, language)
                results[i] = RewardResult(cer_to_reward(rate, self.mapping, self.scale),
                                          {"transcript": hyp, "cer": rate})
        return results  # type: ignore[return-value]


