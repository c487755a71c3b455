"""The emotion reward: probability of the intended emotion under an emotion classifier.

emotion2vec_plus_large (FunASR, 9 classes, index 4 neutral) is the published choice; any Hugging Face
``AutoModelForAudioClassification`` works too. With a target label the reward is P(target); without one it is
1 - P(neutral), which rewards expressive speech in general.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from ..common.audio import check_audio, to_model_rate
from .base import RewardResult, Sample, build_backend
from .hf_audio import load_audio_model


class EmotionClassifier(Protocol):
    labels: list[str]

    def probabilities(self, audios: Sequence[np.ndarray]) -> np.ndarray: ...  # [N, len(labels)]


class Emotion2vecClassifier:
    """emotion2vec through FunASR from its published folder (config.yaml, model.pt, tokens.txt)."""

    def __init__(self, model_dir: str | Path, device: str = "cpu") -> None:
        from .funasr_loader import load_funasr_folder

        self.auto = load_funasr_folder(model_dir, device)
        self.labels = [lb for lb in self.auto.kwargs["tokenizer"].token_list if not lb.startswith("unuse")]

    def probabilities(self, audios: Sequence[np.ndarray]) -> np.ndarray:
        out = self.auto.generate(input=[np.asarray(a, dtype=np.float32) for a in audios], granularity="utterance",
                                 extract_embedding=False)
        return np.array([r["scores"] for r in out], dtype=np.float64)


class AudioClassifierEmotion:
    """Any ``AutoModelForAudioClassification`` whose ``id2label`` names emotions."""

    def __init__(self, model: str | Path | None = None, device: str = "cpu", *, parts: tuple[Any, Any] | None = None):
        self.model, self.extractor = load_audio_model("AutoModelForAudioClassification", model, device, parts)
        self.device = device
        self.labels = [self.model.config.id2label[i] for i in range(self.model.config.num_labels)]

    @torch.no_grad()
    def probabilities(self, audios: Sequence[np.ndarray]) -> np.ndarray:
        inputs = self.extractor(list(audios), sampling_rate=16000, padding=True, return_tensors="pt").to(self.device)
        return self.model(**inputs).logits.softmax(-1).double().cpu().numpy()


def _label_index(labels: Sequence[str], wanted: str) -> int | None:
    """Match 'happy' to 'happy', 'Happy' or emotion2vec's bilingual '开心/happy'."""
    wanted = wanted.lower()
    for i, label in enumerate(labels):
        if wanted in {part.strip().lower() for part in label.split("/")} or label.lower() == wanted:
            return i
    return None


class EmotionReward:
    name = "emotion"

    def __init__(self, classifier: dict[str, Any] | None = None, *, emotion_classifier: EmotionClassifier | None = None):
        if emotion_classifier is None:
            spec = dict(classifier or {})
            kind = spec.pop("kind", "emotion2vec")
            emotion_classifier = build_backend(
                "emotion classifier", {"emotion2vec": Emotion2vecClassifier, "audio_classifier": AudioClassifierEmotion},
                kind, **spec)
        self.classifier = emotion_classifier
        self.neutral = _label_index(self.classifier.labels, "neutral")  # None: only targeted samples can be scored

    def score(self, samples: Sequence[Sample]) -> list[RewardResult]:
        audios = [to_model_rate(check_audio(s.audio, s.sample_rate, what=f"sample {i}"), s.sample_rate)
                  for i, s in enumerate(samples)]
        probs = self.classifier.probabilities(audios)
        results = []
        for i, (s, p) in enumerate(zip(samples, probs)):
            predicted = self.classifier.labels[int(np.argmax(p))]
            if s.emotion:
                k = _label_index(self.classifier.labels, s.emotion)
                if k is None:
                    raise ValueError(f"sample {i}: emotion {s.emotion!r} is not a label of the classifier "
                                     f"({self.classifier.labels})")
                value = float(p[k])
            elif self.neutral is None:
                raise ValueError(f"sample {i} names no emotion and the classifier has no 'neutral' label "
                                 f"({self.classifier.labels}) to score expressiveness against; give the prompt "
                                 "rows an `emotion`")
            else:
                value = 1.0 - float(p[self.neutral])
            results.append(RewardResult(value, {"predicted": predicted}))
        return results
