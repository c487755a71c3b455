"""Speech recognisers for the CER reward. Each takes 16 kHz mono float32 audio and returns text.

- Paraformer (FunASR) for Chinese, as seed-tts-eval and GLM-TTS use;
- Whisper (transformers) for English (whisper-large-v3 in the report);
- PocketSphinx (``pocketsphinx_asr``), whose US-English model ships inside its PyPI package: a weak but real
  recogniser that runs with no hub, for the embedded CPU demo and for tests on real speech.

All three can also time their words (``transcribe_timed``), which lets the CER reward say where the errors are
(:mod:`word_alignment`): pocketsphinx from its word segmentation, Whisper from cross-attention word timestamps (the
checkpoint's ``alignment_heads``), Paraformer from its CIF predictor's per-character timestamps.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
import torch

from .base import build_backend
from .pocketsphinx_asr import PocketSphinxASR
from .timed_transcript import TimedTranscript, TimedWord

logger = logging.getLogger(__name__)


class Transcriber(Protocol):
    def transcribe(self, audios: Sequence[np.ndarray]) -> list[str]: ...


@runtime_checkable
class TimedTranscriber(Transcriber, Protocol):
    """A recogniser that can also say when it heard each word; its ``text`` equals what ``transcribe`` gives.
    ``times_words`` is False where this model cannot (a Whisper checkpoint without alignment heads)."""

    times_words: bool

    def transcribe_timed(self, audios: Sequence[np.ndarray]) -> list[TimedTranscript]: ...


class WhisperASR:
    """Whisper through transformers, batched; loads a local folder or a hub id (e.g. openai/whisper-large-v3)."""

    def __init__(self, model: str | Path, language: str = "en", device: str = "cpu", max_new_tokens: int = 128,
                 dtype: torch.dtype = torch.float32) -> None:
        from transformers import WhisperForConditionalGeneration, WhisperProcessor

        self.processor = WhisperProcessor.from_pretrained(str(model))
        self.model = WhisperForConditionalGeneration.from_pretrained(str(model), dtype=dtype).to(device).eval()
        self.language, self.device, self.max_new_tokens = language, device, max_new_tokens
        self.times_words = bool(getattr(self.model.generation_config, "alignment_heads", None))
        if not self.times_words:
            logger.info("Whisper %s has no alignment_heads in its generation_config: no word times, so the cer "
                        "reward gives no spans for %r", model, language)

    def _generate(self, audios: Sequence[np.ndarray], **settings) -> torch.Tensor | dict[str, torch.Tensor]:
        features = self.processor.feature_extractor(
            list(audios), sampling_rate=16000, return_tensors="pt").input_features.to(self.device, self.model.dtype)
        kwargs = {"max_new_tokens": self.max_new_tokens, **settings}
        if getattr(self.model.generation_config, "lang_to_id", None):
            kwargs.update(language=self.language, task="transcribe")
        return self.model.generate(features, **kwargs)

    def _text(self, ids: torch.Tensor) -> list[str]:
        return [t.strip() for t in self.processor.tokenizer.batch_decode(ids, skip_special_tokens=True)]

    @torch.no_grad()
    def transcribe(self, audios: Sequence[np.ndarray]) -> list[str]:
        return self._text(self._generate(audios))

    @torch.no_grad()
    def transcribe_timed(self, audios: Sequence[np.ndarray]) -> list[TimedTranscript]:
        """Word times as transformers' ``return_timestamps="word"`` gives them: each token's time from dynamic time
        warping over the cross-attention of the checkpoint's ``alignment_heads``, tokens grouped into words as its
        tokenizer does. Asking for them switches the decoder to eager attention, which can change a transcript only
        at float rounding level."""
        from transformers.models.whisper.tokenization_whisper import _combine_tokens_into_words

        if not self.times_words:
            raise ValueError("this Whisper checkpoint's generation_config has no alignment_heads, which word "
                             "timestamps need; set them, or turn the cer reward's spans off")
        out = self._generate(audios, return_token_timestamps=True)
        tokenizer = self.processor.tokenizer
        transcripts = []
        for text, ids, times in zip(self._text(out["sequences"]), out["sequences"].tolist(),
                                    out["token_timestamps"].tolist(), strict=True):
            positions = [k for k, t in enumerate(ids) if t < tokenizer.eos_token_id]  # text tokens, not special ones
            words, _, groups = _combine_tokens_into_words(tokenizer, [ids[k] for k in positions], self.language)
            transcripts.append(TimedTranscript(text, tuple(
                TimedWord(word.strip(), times[positions[g[0]]], times[min(positions[g[-1]] + 1, len(times) - 1)])
                for word, g in zip(words, groups))))
        return transcripts


class ParaformerASR:
    """Paraformer (FunASR) from its published folder (config.yaml, model.pt, tokens, am.mvn)."""

    times_words = True

    def __init__(self, model_dir: str | Path, device: str = "cpu") -> None:
        from .funasr_loader import load_funasr_folder

        self.auto = load_funasr_folder(model_dir, device)

    def transcribe(self, audios: Sequence[np.ndarray]) -> list[str]:
        out = self.auto.generate(input=[np.asarray(a, dtype=np.float32) for a in audios], batch_size=len(audios))
        return [r["text"].replace(" ", "") for r in out]

    def transcribe_timed(self, audios: Sequence[np.ndarray]) -> list[TimedTranscript]:
        """A time per token (a character for Chinese) from the CIF predictor's firing points, in milliseconds."""
        out = self.auto.generate(input=[np.asarray(a, dtype=np.float32) for a in audios], batch_size=len(audios),
                                 output_timestamp=True)
        transcripts = []
        for r in out:
            tokens, times = r["text"].split(), r.get("timestamp", [])
            if len(times) != len(tokens):
                raise ValueError(f"this FunASR model gave {len(times)} timestamps for {len(tokens)} tokens; its "
                                 "predictor cannot time characters: turn the cer reward's spans off")
            transcripts.append(TimedTranscript(r["text"].replace(" ", ""), tuple(
                TimedWord(token, start_ms / 1000.0, end_ms / 1000.0) for token, (start_ms, end_ms) in zip(tokens, times))))
        return transcripts


def build_asr(kind: str, **settings) -> Transcriber:
    return build_backend("ASR", {"pocketsphinx": PocketSphinxASR, "whisper": WhisperASR, "paraformer": ParaformerASR},
                         kind, **settings)
