"""Text + voice prompt -> 24 kHz speech, offline or streaming: the GLM-TTS stack end to end.

speech LM (text -> 25 Hz speech tokens) -> flow matching (tokens -> mel, conditioned on the prompt's mel and speaker
embedding) -> HiFT (mel -> audio). Several utterances go through every stage as one batch, which is how the GRPO
rollout environment uses it. Long text is split into 30-60 character chunks generated in turn, each carrying the
voice prompt and the previous chunks as context.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from vocalign.rewards.audio import check_audio, to_model_rate

from .flow import FlowInput, FlowMatching
from .frontend.g2p import PhonemeFrontend
from .frontend.text import join_text, normalize_text, split_text
from .mel import MEL_24K, log_mel
from .speaker import CampPlus
from .speech_lm import SpeechLM, TTSPrompt
from .speech_tokenizer import SpeechTokenizer
from .vocoder import HiFT

SAMPLE_RATE = 24000


@dataclass
class VoicePrompt:
    """What the models need from a voice prompt; compute once with :meth:`TTSPipeline.prepare_prompt`."""

    text: str
    codes: list[int]  # 25 Hz speech tokens
    mel: torch.Tensor  # [2 * len(codes), 80] 24 kHz log-mel
    speaker: torch.Tensor  # [192] CAM++ embedding


@dataclass(frozen=True)
class SynthesisSettings:
    temperature: float = 1.0
    top_k: int | None = 25
    top_p: float | None = 0.8
    flow_steps: int = 10
    max_new_tokens: int | None = None


class TTSPipeline:
    def __init__(self, speech_lm: SpeechLM, flow: FlowMatching, vocoder: HiFT, speech_tokenizer: SpeechTokenizer,
                 speaker: CampPlus, phonemes: PhonemeFrontend | None = None) -> None:
        self.lm, self.flow, self.vocoder = speech_lm, flow, vocoder
        self.speech_tokenizer, self.speaker, self.phonemes = speech_tokenizer, speaker, phonemes
        self.sample_rate = SAMPLE_RATE
        self.max_context = 750  # LM prompt tokens (text + speech) a long text's chunk may carry, as released

    @classmethod
    def from_pretrained(cls, ckpt: str | Path, *, num_codes: int | None = None, trust_remote_code: bool = False,
                        phonemes: PhonemeFrontend | None = None, adapter: str | Path | None = None,
                        device: str = "cpu") -> TTSPipeline:
        """The published ``ckpt/`` layout: llm, vq32k-phoneme-tokenizer, speech_tokenizer, flow, hift, frontend.
        ``adapter``: a peft LoRA folder (a custom voice), merged into the speech LM."""
        ckpt = Path(ckpt)
        if not ckpt.is_dir():
            raise FileNotFoundError(f"checkpoint folder {ckpt} does not exist")
        tokenizer = SpeechTokenizer.from_pretrained(ckpt / "speech_tokenizer", device)
        codes = num_codes or tokenizer.encoder.config.quantize_vocab_size
        lm = SpeechLM.from_pretrained(ckpt, num_codes=codes, trust_remote_code=trust_remote_code, device=device)
        if adapter is not None:
            from peft import PeftModel

            lm.model = PeftModel.from_pretrained(lm.model, str(adapter)).merge_and_unload().eval()
        return cls(lm, FlowMatching.from_pretrained(ckpt / "flow", device), HiFT.from_pretrained(ckpt / "hift", device),
                   tokenizer, CampPlus(ckpt / "frontend" / "campplus.onnx"), phonemes)

    # ------------------------------------------------------------------ inputs
    def prepare_prompt(self, audio: np.ndarray, sample_rate: int, text: str) -> VoicePrompt:
        audio = check_audio(audio, sample_rate, what="prompt audio", max_seconds=30.0)
        audio16 = to_model_rate(audio, sample_rate, 16000)
        codes = self.speech_tokenizer([audio16])[0]
        mel = log_mel(torch.from_numpy(to_model_rate(audio, sample_rate, SAMPLE_RATE)), MEL_24K).T
        usable = min(len(codes), mel.shape[0] // 2)  # two mel frames per token
        if usable == 0:
            raise ValueError("the prompt audio is too short to give any speech token")
        return VoicePrompt(normalize_text(text), codes[:usable], mel[: 2 * usable],
                           torch.from_numpy(self.speaker(audio16)).float())

    def text_input(self, text: str) -> str:
        text = normalize_text(text)
        return self.phonemes.convert(text) if self.phonemes is not None else text

    # ------------------------------------------------------------------ stages
    def generate_codes(self, texts: Sequence[str], prompts: Sequence[VoicePrompt], num_generations: int = 1,
                       settings: SynthesisSettings = SynthesisSettings(), model: torch.nn.Module | None = None):
        """Speech LM stage for a batch; returns ``(prompt_ids, prompt_mask, sampled, codes)``."""
        requests = [TTSPrompt(self.text_input(t), p.text, p.codes) for t, p in zip(texts, prompts, strict=True)]
        ids, mask, sampled = self.lm.generate(requests, num_generations, model=model, temperature=settings.temperature,
                                              top_k=settings.top_k, top_p=settings.top_p,
                                              max_new_tokens=settings.max_new_tokens)
        return ids, mask, sampled, self.lm.codes(sampled)

    def codes_to_audio(self, codes: Sequence[Sequence[int]], prompts: Sequence[VoicePrompt], flow_steps: int = 10
                       ) -> list[np.ndarray]:
        """Flow (batched) and vocoder for each utterance; an empty code list gives empty audio."""
        index = [i for i, c in enumerate(codes) if len(c)]
        audio: list[np.ndarray] = [np.zeros(0, dtype=np.float32) for _ in codes]
        if not index:
            return audio
        mels = self.flow.generate([FlowInput(torch.tensor(codes[i]), torch.tensor(prompts[i].codes), prompts[i].mel,
                                             prompts[i].speaker) for i in index], steps=flow_steps)
        for i, mel in zip(index, mels):
            audio[i] = self.vocoder(mel.unsqueeze(0))[0].cpu().numpy()
        return audio

    # ------------------------------------------------------------------ user-facing
    def long_text_codes(self, text: str, prompt: VoicePrompt, settings: SynthesisSettings = SynthesisSettings()
                        ) -> Iterator[list[int]]:
        """Speech codes chunk by chunk. As released, each chunk's LM prompt is the voice prompt followed by earlier
        chunks (their text and generated tokens), oldest dropped first, while it stays under ``max_context``
        tokens, so that voice and prosody carry across chunks."""
        history: list[tuple[str, list[int]]] = []
        for chunk in split_text(text) or [text]:
            context = list(history)
            while context and self._prompt_tokens(prompt, context, chunk) > self.max_context:
                context.pop(0)
            lm_prompt = VoicePrompt(text=self._context_text(prompt, context),
                                    codes=prompt.codes + [c for _, codes in context for c in codes],
                                    mel=prompt.mel, speaker=prompt.speaker)
            _, _, _, (codes,) = self.generate_codes([chunk], [lm_prompt], 1, settings)
            history.append((chunk, codes))
            yield codes

    def _context_text(self, prompt: VoicePrompt, context: Sequence[tuple[str, list[int]]]) -> str:
        text = prompt.text
        for chunk, _ in context:
            text = join_text(text, chunk)
        return text

    def _prompt_tokens(self, prompt: VoicePrompt, context: Sequence[tuple[str, list[int]]], chunk: str) -> int:
        text = self.lm.tokenizer(self.text_input(join_text(self._context_text(prompt, context), chunk)),
                                 add_special_tokens=False).input_ids
        return len(text) + len(prompt.codes) + sum(len(codes) for _, codes in context)

    def synthesize(self, text: str, prompt: VoicePrompt, settings: SynthesisSettings = SynthesisSettings()
                   ) -> np.ndarray:
        """Offline synthesis of (possibly long) text: codes chunk by chunk, then one batched flow + vocoder pass."""
        codes = list(self.long_text_codes(text, prompt, settings))
        pieces = self.codes_to_audio(codes, [prompt] * len(codes), settings.flow_steps)
        return np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.float32)

    def stream(self, text: str, prompt: VoicePrompt, settings: SynthesisSettings = SynthesisSettings(),
               blocks: Sequence[int] = (25, 50, 200), lookahead: Sequence[int] = (12, 25, 100),
               crossfade_s: float = 0.1) -> Iterator[np.ndarray]:
        """Audio in pieces as token blocks become ready (25, 50, 200, then 200 tokens), each block's mel computed
        with a look-ahead of tokens past its end and the same starting noise, joined with a short cross-fade."""
        for codes in self.long_text_codes(text, prompt, settings):
            yield from self._stream_codes(codes, prompt, settings.flow_steps, blocks, lookahead, crossfade_s)

    def _stream_codes(self, codes: Sequence[int], prompt: VoicePrompt, steps: int, blocks: Sequence[int],
                      lookahead: Sequence[int], crossfade_s: float) -> Iterator[np.ndarray]:
        hop = MEL_24K.hop
        fade = int(crossfade_s * SAMPLE_RATE)
        noise = torch.randn(self.flow.frames_for(len(prompt.codes) + len(codes)), self.flow.cfg.mel_dim)
        start, k, held = 0, 0, None
        while start < len(codes):
            size = blocks[min(k, len(blocks) - 1)]
            end = min(start + size, len(codes))
            ahead = min(end + lookahead[min(k, len(lookahead) - 1)], len(codes))
            mel = self.flow.generate([FlowInput(torch.tensor(codes[:ahead]), torch.tensor(prompt.codes), prompt.mel,
                                                prompt.speaker)], steps=steps, noise=[noise])[0]
            frame_start, frame_end = 2 * start, 2 * end
            overlap = 0 if held is None else len(held)
            # left context for the vocoder's receptive field, and to re-synthesise the held-back overlap
            context = min(frame_start, -(-overlap // hop) + 4)
            audio = self.vocoder(mel[:, frame_start - context:frame_end].unsqueeze(0))[0].cpu().numpy()
            audio = audio[context * hop - overlap:]
            if held is not None:  # the previous piece's held-back tail fades into the same span synthesised again
                ramp = np.linspace(0.0, 1.0, overlap, dtype=np.float32)
                audio = np.concatenate([held * (1 - ramp) + audio[:overlap] * ramp, audio[overlap:]])
            last = end == len(codes)
            if not last and len(audio) > fade:
                held, audio = audio[-fade:], audio[:-fade]
            yield audio
            start, k = end, k + 1
