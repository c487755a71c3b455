"""The laughter reward of the GLM-TTS report.

When the text asks for laughter (two or more consecutive laughter words: "ha ha", "hey hey", 哈哈, 嘿嘿, 呵呵) and a
laughter detector finds a laughter segment in the audio, the model laughed. The reward then asks whether it laughed
*like a human*: an ASR that deletes the segment heard laughter (reward 1); one that transcribes "ha ha" heard the
words read out (reward 0). Texts without laughter, or audio without a detected laugh, score 0, a constant that
carries no gradient after per-reward normalisation. The transcript comes from the CER reward (``requires``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from ..common.audio import check_audio, to_model_rate
from .base import RewardResult, Sample
from .hf_audio import load_audio_model

_EN_WORD = r"(?:ha|hah|hey|he|hee)"
_EN_RUN = re.compile(rf"\b{_EN_WORD}(?:[\s,!.~-]*{_EN_WORD})+\b|\b(?:ha){{2,}}h?\b|\b(?:he){{2,}}\b", re.IGNORECASE)
_ZH_RUN = re.compile(r"(?:哈|嘿|呵){2,}")
# "he" alone is a pronoun, so a transcript counts as laughing only on ha/hah/hey, runs like "haha"/"hehe", or 哈嘿呵
_ANY_LAUGH_WORD = re.compile(r"\b(?:ha|hah|hey)\b|\b(?:ha){2,}h?\b|\b(?:he){2,}\b|[哈嘿呵]", re.IGNORECASE)


def asks_for_laughter(text: str) -> bool:
    """Two or more consecutive laughter words in the text."""
    return bool(_ZH_RUN.search(text) or _EN_RUN.search(text))


def transcribes_laughter(transcript: str) -> bool:
    return bool(_ANY_LAUGH_WORD.search(transcript))


class LaughterDetector(Protocol):
    def segments(self, audio: np.ndarray) -> list[tuple[float, float]]: ...  # 16 kHz in, (start_s, end_s) out


class AudioClassifierLaughterDetector:
    """Slides an ``AutoModelForAudioClassification`` (e.g. an AudioSet AST, whose classes include "Laughter")
    over the audio and returns the windows where P(laughter label) exceeds ``threshold``, merged."""

    def __init__(self, model: str | Path | None = None, label: str = "Laughter", threshold: float = 0.5,
                 window_s: float = 1.0, hop_s: float = 0.5, device: str = "cpu", *,
                 parts: tuple[Any, Any] | None = None) -> None:
        self.model, self.extractor = load_audio_model("AutoModelForAudioClassification", model, device, parts)
        names = {v.lower(): int(k) for k, v in self.model.config.id2label.items()}
        if label.lower() not in names:
            raise ValueError(f"the detector model has no {label!r} class; its classes are "
                             f"{sorted(self.model.config.id2label.values())[:20]} ...")
        self.index, self.threshold, self.window_s, self.hop_s, self.device = (
            names[label.lower()], threshold, window_s, hop_s, device)

    @torch.no_grad()
    def segments(self, audio: np.ndarray) -> list[tuple[float, float]]:
        rate, win, hop = 16000, int(self.window_s * 16000), int(self.hop_s * 16000)
        starts = list(range(0, max(len(audio) - win, 0) + 1, hop))
        windows = [audio[s:s + win] for s in starts]
        inputs = self.extractor(windows, sampling_rate=rate, padding=True, return_tensors="pt").to(self.device)
        probs = self.model(**inputs).logits.softmax(-1)[:, self.index].cpu().tolist()
        found: list[tuple[float, float]] = []
        for s, p in zip(starts, probs):
            if p < self.threshold:
                continue
            begin, end = s / rate, min(s + win, len(audio)) / rate
            if found and begin <= found[-1][1]:
                found[-1] = (found[-1][0], end)
            else:
                found.append((begin, end))
        return found


class LaughterReward:
    name = "laughter"
    requires = ("cer",)

    def __init__(self, detector: dict[str, Any] | None = None, *, laughter_detector: LaughterDetector | None = None):
        if laughter_detector is None:
            if not detector:
                raise ValueError("the laughter reward needs a detector: `detector: {model: PATH, label: Laughter}`")
            laughter_detector = AudioClassifierLaughterDetector(**detector)
        self.detector = laughter_detector

    def score(self, samples: Sequence[Sample],
              upstream: Mapping[str, Sequence[RewardResult]] | None = None) -> list[RewardResult]:
        if not upstream or "cer" not in upstream:
            raise ValueError("the laughter reward needs the cer reward's transcripts (configure `cer` too)")
        results = []
        for i, (s, cer) in enumerate(zip(samples, upstream["cer"])):
            if not asks_for_laughter(s.text):
                results.append(RewardResult(0.0, {"applies": False}))
                continue
            audio = to_model_rate(check_audio(s.audio, s.sample_rate, what=f"sample {i}"), s.sample_rate)
            found = self.detector.segments(audio)
            if "transcript" not in cer.info:
                raise ValueError(f"sample {i}: the cer result carries no transcript, so the laughter reward cannot "
                                 "tell whether the ASR deleted the laughter; use a cer plugin that reports one")
            transcript = cer.info["transcript"]
            laughed_like_a_human = bool(found) and not transcribes_laughter(transcript)
            results.append(RewardResult(float(laughed_like_a_human),
                                        {"applies": True, "segments": found, "transcript": transcript}))
        return results
