"""Speech recognisers for the CER reward. Each takes 16 kHz mono float32 audio and returns text.

- Paraformer (FunASR) for Chinese, as seed-tts-eval and GLM-TTS use;
- Whisper (transformers) for English (whisper-large-v3 in the report);
- PocketSphinx, whose US-English model ships inside its PyPI package: a weak but real recogniser that runs with no
  hub, for the embedded CPU demo and for tests on real speech.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from .base import build_backend


class Transcriber(Protocol):
    def transcribe(self, audios: Sequence[np.ndarray]) -> list[str]: ...


class PocketSphinxASR:
    """Offline US-English recogniser with the acoustic model, LM and dictionary pocketsphinx ships.

    Its general-English language model is a weak judge of isolated words (word error rate about 1.0 on espeak-ng
    digit strings); restricted to a task's words it is a sharp one (about 0.2). ``vocabulary`` makes a grammar that
    accepts any sequence of the given words; ``jsgf`` loads a JSGF grammar file; without either the shipped LM is
    used.
    """

    def __init__(self, vocabulary: Sequence[str] | None = None, jsgf: str | Path | None = None,
                 decoder_options: Mapping[str, Any] | None = None) -> None:
        """``decoder_options``: pocketsphinx settings, e.g. ``{beam: 1.0e-30, wbeam: 1.0e-20}`` (narrower beams than
        the defaults 1e-48 and 7e-29 decode a grammar of ten words 1.6x faster at the same error rate)."""
        from pocketsphinx import Decoder

        if vocabulary and jsgf:
            raise ValueError("give pocketsphinx either `vocabulary` or `jsgf`, not both")
        options = dict(decoder_options or {})
        if "samprate" in options or "logfn" in options:
            raise ValueError("pocketsphinx decoder_options cannot set samprate or logfn (16 kHz audio, no log file)")
        try:
            self.decoder = Decoder(samprate=16000, logfn="/dev/null", **options)
        except (KeyError, ValueError) as err:  # an unknown option or a value of the wrong type
            raise ValueError(f"pocketsphinx rejected decoder_options {options}: {err}") from None
        if vocabulary:
            words = sorted({w.lower() for w in vocabulary})
            unknown = [w for w in words if self.decoder.lookup_word(w) is None]
            if unknown:
                raise ValueError(f"pocketsphinx's dictionary has no {unknown}; use words it knows or a jsgf grammar")
            grammar = "#JSGF V1.0;\ngrammar words;\npublic <utterance> = ( " + " | ".join(words) + " )+ ;\n"
            self.decoder.set_jsgf_string("words", grammar)
            self.decoder.activate_search("words")
        elif jsgf:
            if not Path(jsgf).is_file():
                raise FileNotFoundError(f"JSGF grammar {jsgf} does not exist")
            self.decoder.set_jsgf_file("grammar", str(jsgf))
            self.decoder.activate_search("grammar")

    def transcribe(self, audios: Sequence[np.ndarray]) -> list[str]:
        texts = []
        for audio in audios:
            pcm = (np.clip(audio, -1.0, 1.0) * 32767).astype("<i2").tobytes()
            self.decoder.start_utt()
            self.decoder.process_raw(pcm, full_utt=True)
            self.decoder.end_utt()
            hyp = self.decoder.hyp()
            texts.append(hyp.hypstr if hyp is not None else "")
        return texts


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
