"""The CER reward: transcribe, compare with the text, map the error rate to a reward.

GLM-TTS uses exp(-2.5 * CER), which keeps a useful slope near CER 0 where a well-trained model lives; a linear
1 - CER is offered for ablations. The transcript travels in ``info`` so the laughter reward can reuse it.

With an ASR that times its words (all built-in backends, see :mod:`asr`), each result also carries ``spans``: where
in the audio each recognised word was right, wrong or missing (values in :mod:`word_alignment`), so that training can
credit the speech tokens that made the error. The transcript and the scalar are the same with or without them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from ..common.audio import check_audio, to_model_rate
from .asr import TimedTranscriber, Transcriber, build_asr
from .base import RewardResult, Sample
from .text_norm import error_rate
from .timed_transcript import TimedTranscript
from .word_alignment import error_spans


def cer_to_reward(cer: float, mapping: str = "exp", scale: float = 2.5) -> float:
    if mapping == "exp":
        return math.exp(-scale * cer)
    if mapping == "linear":
        return max(0.0, 1.0 - cer)
    raise ValueError(f"CER reward mapping must be 'exp' or 'linear', got {mapping!r}")


class CERReward:
    name = "cer"
    roles = {"error_rate": "cer"}  # info["cer"] is the recogniser's CER/WER, which evaluation tables report

    def __init__(self, asr: Mapping[str, Any] | None = None, mapping: str = "exp", scale: float = 2.5,
                 transcribers: Mapping[str, Transcriber] | None = None, spans: bool = True) -> None:
        """``asr`` maps a language to a backend spec, e.g. ``{"en": {"kind": "whisper", "model": "..."},
        "zh": {"kind": "paraformer", "model_dir": "..."}}``; default: pocketsphinx for English. ``spans``: say where
        the errors are, for the languages whose ASR times its words (off: the plain transcription, as before)."""
        cer_to_reward(0.0, mapping, scale)  # validate early
        self.mapping, self.scale, self.spans = mapping, scale, spans
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
            transcriber = self.transcribers[language]
            timed = self.spans and isinstance(transcriber, TimedTranscriber) and transcriber.times_words
            transcripts = (transcriber.transcribe_timed(audios) if timed
                           else [TimedTranscript(text, ()) for text in transcriber.transcribe(audios)])
            for i, transcript in zip(indices, transcripts, strict=True):
                sample = samples[i]
                rate = error_rate(sample.text, transcript.text, language)
                spans = (error_spans(sample.text, transcript.words, language, len(sample.audio) / sample.sample_rate)
                         if timed else [])
                results[i] = RewardResult(cer_to_reward(rate, self.mapping, self.scale),
                                          {"transcript": transcript.text, "cer": rate}, spans=spans)
        return results  # type: ignore[return-value]


