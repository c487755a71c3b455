"""Speech recognisers for the CER reward. Each takes 16 kHz mono float32 audio and returns text.

- Paraformer (FunASR) for Chinese, as seed-tts-eval and GLM-TTS use;
- Whisper (transformers) for English (whisper-large-v3 in the report);
- PocketSphinx (``pocketsphinx_asr``), whose US-English model ships inside its PyPI package: a weak but real
  recogniser that runs with no hub, for the embedded CPU demo and for tests on real speech.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from .base import build_backend
from .pocketsphinx_asr import PocketSphinxASR


class Transcriber(Protocol):
    def transcribe(self, audios: Sequence[np.ndarray]) -> list[str]: ...


class WhisperASR:
    """Whisper through transformers, batched; loads a local folder or a hub id (e.g. openai/whisper-large-v3)."""

    def __init__(self, model: str | Path, language: str = "en", device: str = "cpu", max_new_tokens: int = 128,
                 dtype: torch.dtype = torch.float32) -> None:
        from transformers import WhisperForConditionalGeneration, WhisperProcessor

        self.processor = WhisperProcessor.from_pretrained(str(model))
        self.model = WhisperForConditionalGeneration.from_pretrained(str(model), dtype=dtype).to(device).eval()
        self.language, self.device, self.max_new_tokens = language, device, max_new_tokens

    @torch.no_grad()
    def transcribe(self, audios: Sequence[np.ndarray]) -> list[str]:
        features = self.processor.feature_extractor(
            list(audios), sampling_rate=16000, return_tensors="pt").input_features.to(self.device, self.model.dtype)
        kwargs = {"max_new_tokens": self.max_new_tokens}
        if getattr(self.model.generation_config, "lang_to_id", None):
            kwargs.update(language=self.language, task="transcribe")
        ids = self.model.generate(features, **kwargs)
        return [t.strip() for t in self.processor.tokenizer.batch_decode(ids, skip_special_tokens=True)]


class ParaformerASR:
    """Paraformer (FunASR) from its published folder (config.yaml, model.pt, tokens, am.mvn)."""

    def __init__(self, model_dir: str | Path, device: str = "cpu") -> None:
        from .funasr_loader import load_funasr_folder

        self.auto = load_funasr_folder(model_dir, device)

    def transcribe(self, audios: Sequence[np.ndarray]) -> list[str]:
        out = self.auto.generate(input=[np.asarray(a, dtype=np.float32) for a in audios], batch_size=len(audios))
        return [r["text"].replace(" ", "") for r in out]


def build_asr(kind: str, **settings) -> Transcriber:
    return build_backend("ASR", {"pocketsphinx": PocketSphinxASR, "whisper": WhisperASR, "paraformer": ParaformerASR},
                         kind, **settings)
