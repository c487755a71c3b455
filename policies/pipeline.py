"""Text + voice prompt -> speech, offline or streaming: a two-stage TTS end to end.

speech LM (text -> speech codes) -> the codec's decoder (GLM-TTS: flow matching conditioned on the prompt's mel and
speaker embedding, then HiFT; the CPU demo: mel units and Griffin-Lim). Several utterances go through every stage as
one batch, which is how the GRPO rollout environment uses it. Long text is split into 30-60 character chunks
generated in turn, each carrying the voice prompt and the previous chunks as context.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..common.audio import check_audio
from ..common.generation import SamplingParams
from .codec import GLMTTSCodec, MelUnitCodec, SpeechCodec, StreamingCodec, VoicePrompt
from .frontend.g2p import PhonemeFrontend, as_tokens
from .frontend.text import normalize_text, split_text
from .long_text import Turn, chunk_prompt
from .sampling import RELEASED_SAMPLING
from .speech_lm import SpeechLM, TTSPrompt
from .streaming import RELEASED_BLOCKS, RELEASED_FADE_S, RELEASED_LOOKAHEAD

MEL_UNITS_DIR = "mel_units"

__all__ = ["SynthesisSettings", "TTSPipeline", "VoicePrompt", "lm_text", "lm_text_chunks", "load_codec"]


@dataclass(frozen=True)
class SynthesisSettings(SamplingParams):
    """Sampling as GLM-TTS synthesises by default, plus the flow's ODE steps."""

    top_k: int | None = RELEASED_SAMPLING.top_k
    top_p: float | None = RELEASED_SAMPLING.top_p
    flow_steps: int = 10


def load_codec(ckpt: str | Path, device: str = "cpu", sample_rate: int | None = None) -> SpeechCodec:
    """The codec a checkpoint folder holds: ``mel_units/`` (the CPU demo), else the published GLM-TTS layout
    (``speech_tokenizer/``, ``flow/``, ``hift/`` and/or ``vocos2d/``, ``frontend/campplus.onnx``). ``sample_rate``:
    the GLM-TTS output rate, 24000 (HiFT) or 32000 (Vocos2D); None: as the checkpoint's files allow, 24 kHz first."""
    ckpt = Path(ckpt)
    if (ckpt / MEL_UNITS_DIR).is_dir():
        codec = MelUnitCodec.from_pretrained(ckpt / MEL_UNITS_DIR)
        if sample_rate not in (None, codec.sample_rate):
            raise ValueError(f"{ckpt} is a mel-unit checkpoint: it decodes at {codec.sample_rate} Hz only, "
                             f"not {sample_rate}")
        return codec
    return GLMTTSCodec.from_pretrained(ckpt, device, sample_rate)


def lm_text(text: str, phonemes: PhonemeFrontend | None) -> str:
    """What the speech LM reads for a short text, as released: the normalised text, then phoneme-in if it is on
    (G2P after normalisation, so that digits and symbols are read as the words they become)."""
    text = normalize_text(text)
    return phonemes.convert(text) if phonemes is not None else text


def lm_text_chunks(text: str, phonemes: PhonemeFrontend | None) -> list[str]:
    """What the speech LM reads for each chunk of a (possibly long) text, in the release's order: normalise, split
    into 30-60 character chunks, then :func:`lm_text` of each chunk."""
    return [lm_text(chunk, phonemes) for chunk in split_text(normalize_text(text))]


class TTSPipeline:
    def __init__(self, speech_lm: SpeechLM, codec: SpeechCodec, phonemes: PhonemeFrontend | None = None) -> None:
        if speech_lm.vocab.num_codes != codec.num_codes:
            raise ValueError(f"the speech LM has {speech_lm.vocab.num_codes} speech tokens but the codec "
                             f"{codec.num_codes} codes")
        if phonemes is not None and phonemes.g2p.inventory is not None:
            vocab = speech_lm.tokenizer.get_vocab()
            missing = sorted(p for p in phonemes.g2p.inventory if as_tokens([p]) not in vocab)
            if missing:
                raise ValueError(f"phoneme-in: the speech LM's tokenizer has no token for {len(missing)} phonemes "
                                 f"(e.g. {as_tokens(missing[:3])}); this checkpoint was not trained with phoneme "
                                 "input, so synthesise without phonemes")
        self.lm, self.codec, self.phonemes = speech_lm, codec, phonemes
        self.sample_rate = codec.sample_rate
        self.max_context = 750  # LM prompt tokens (text + speech) a long text's chunk may carry, as released

    @classmethod
    def from_pretrained(cls, ckpt: str | Path, *, trust_remote_code: bool = False,
                        phonemes: PhonemeFrontend | None = None, adapter: str | Path | None = None,
                        device: str = "cpu", sample_rate: int | None = None) -> TTSPipeline:
        """A checkpoint folder: ``llm/`` and ``vq32k-phoneme-tokenizer/`` plus a codec (:func:`load_codec`, which
        ``sample_rate`` goes to). ``adapter``: a peft LoRA folder (a custom voice), merged into the speech LM.
        ``phonemes``: phoneme-in (the release's ``use_phoneme``), applied to each chunk after normalisation."""
        ckpt = Path(ckpt)
        if not ckpt.is_dir():
            raise FileNotFoundError(f"checkpoint folder {ckpt} does not exist")
        codec = load_codec(ckpt, device, sample_rate)
        lm = SpeechLM.from_pretrained(ckpt, num_codes=codec.num_codes, trust_remote_code=trust_remote_code,
                                      device=device)
        if adapter is not None:
            from peft import PeftModel

            lm.model = PeftModel.from_pretrained(lm.model, str(adapter)).merge_and_unload().eval()
        return cls(lm, codec, phonemes)

    # ------------------------------------------------------------------ inputs
    def prepare_prompt(self, audio: np.ndarray, sample_rate: int, text: str) -> VoicePrompt:
        audio = check_audio(audio, sample_rate, what="prompt audio", max_seconds=30.0)
        codes, condition = self.codec.encode_prompt(audio, sample_rate)
        return VoicePrompt(normalize_text(text), codes, condition)

    def text_input(self, text: str) -> str:
        return lm_text(text, self.phonemes)

    # ------------------------------------------------------------------ stages
    def generate_codes(self, texts: Sequence[str], prompts: Sequence[VoicePrompt], num_generations: int = 1,
                       sampling: SamplingParams = RELEASED_SAMPLING, model: torch.nn.Module | None = None):
        """Speech LM stage for a batch; returns ``(prompt_ids, prompt_mask, sampled, codes)``."""
        requests = [TTSPrompt(self.text_input(t), p.text, p.codes) for t, p in zip(texts, prompts, strict=True)]
        return self._generate(requests, num_generations, sampling, model)

    def _generate(self, requests: Sequence[TTSPrompt], num_generations: int, sampling: SamplingParams,
                  model: torch.nn.Module | None = None):
        ids, mask, sampled = self.lm.generate(requests, num_generations, model=model, sampling=sampling)
        return ids, mask, sampled, self.lm.codes(sampled)

    def codes_to_audio(self, codes: Sequence[Sequence[int]], prompts: Sequence[VoicePrompt], flow_steps: int = 10
                       ) -> list[np.ndarray]:
        """The codec's decoder for a batch; an empty code list gives empty audio."""
        return self.codec.decode(codes, prompts, flow_steps)

    # ------------------------------------------------------------------ user-facing
    def long_text_codes(self, text: str, prompt: VoicePrompt, settings: SynthesisSettings = SynthesisSettings()
                        ) -> Iterator[list[int]]:
        """Speech codes chunk by chunk, as released: the text is normalised, split, and each chunk normalised
        again; each chunk's LM prompt is the voice prompt followed by earlier chunks (their ids as fed and their
        generated codes), the oldest dropped for good while the speech budget (``max_context``) would be exceeded
        (:func:`vocalign.policies.long_text.chunk_prompt`), so that voice and prosody carry across chunks."""
        voice = Turn.of(self.lm.text_ids(prompt.text + " "), prompt.codes)  # prompt.text is already normalised
        history: list[Turn] = []
        for chunk_text in lm_text_chunks(text, self.phonemes):
            chunk_ids = self.lm.text_ids(chunk_text)
            context = chunk_prompt(voice, history, chunk_ids, self.max_context)
            request = TTSPrompt(chunk_text, prompt.text, context.codes, prompt_text_ids=context.text_ids)
            _, _, _, (codes,) = self._generate([request], 1, settings)
            history = context.history + [Turn.of(chunk_ids, codes)]
            yield codes

    def synthesize(self, text: str, prompt: VoicePrompt, settings: SynthesisSettings = SynthesisSettings()
                   ) -> np.ndarray:
        """Offline synthesis of (possibly long) text: codes chunk by chunk, then one batched decode."""
        codes = list(self.long_text_codes(text, prompt, settings))
        pieces = self.codes_to_audio(codes, [prompt] * len(codes), settings.flow_steps)
        return np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.float32)

    def stream(self, text: str, prompt: VoicePrompt, settings: SynthesisSettings = SynthesisSettings(),
               blocks: Sequence[int] = RELEASED_BLOCKS, lookahead: Sequence[int] = RELEASED_LOOKAHEAD,
               crossfade_s: float = RELEASED_FADE_S) -> Iterator[np.ndarray]:
        """Audio in pieces as token blocks become ready (25, 50, 200, then 200 tokens), as the release streams
        (:mod:`vocalign.policies.streaming`; codecs that stream: GLM-TTS's, with either vocoder). Long text: chunk
        by chunk, each chunk streamed once its codes are generated."""
        if not isinstance(self.codec, StreamingCodec):
            raise ValueError(f"{type(self.codec).__name__} does not stream; synthesise offline instead")
        for codes in self.long_text_codes(text, prompt, settings):
            yield from self.codec.stream(codes, prompt, settings.flow_steps, blocks, lookahead, crossfade_s)
