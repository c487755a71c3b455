"""Speech in and out of the speech LM's codes: the stages around the LM, behind one interface.

A two-stage TTS is a speech LM between a speech tokenizer (prompt audio -> codes) and a token-to-audio decoder
(codes -> audio, conditioned on the voice prompt). GLM-TTS's are a Whisper-VQ tokenizer, flow matching with CAM++
speaker embeddings, and HiFT (:class:`GLMTTSCodec`); vocalign's CPU demo uses k-means mel units and Griffin-Lim
(:class:`MelUnitCodec`). The pipeline, the rollout environment and the trainer see only :class:`SpeechCodec`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch

from vocalign.rewards.audio import to_model_rate

from .flow import FlowInput, FlowMatching
from .mel import MEL_24K, log_mel
from .mel_units import MelUnits
from .speaker import CampPlus
from .speech_tokenizer import SpeechTokenizer
from .vocoder import HiFT


@dataclass
class VoicePrompt:
    """What the models need from a voice prompt; compute once with ``TTSPipeline.prepare_prompt``."""

    text: str
    codes: list[int]  # speech codes of the prompt audio
    condition: Any = None  # what the codec's decoder needs from the prompt (GLM-TTS: its mel and speaker embedding)


@runtime_checkable
class SpeechCodec(Protocol):
    sample_rate: int  # of the audio ``decode`` returns
    num_codes: int

    def tokenize(self, audio: np.ndarray, sample_rate: int) -> list[int]:
        """Speech codes of mono float audio (for SFT data)."""

    def encode_prompt(self, audio: np.ndarray, sample_rate: int) -> tuple[list[int], Any]:
        """Codes of a voice prompt and the decoder's condition from it."""

    def decode(self, codes: Sequence[Sequence[int]], prompts: Sequence[VoicePrompt], flow_steps: int = 10
               ) -> list[np.ndarray]:
        """Audio for each code sequence in the voice of its prompt; empty codes give empty audio. ``flow_steps``
        is the flow model's number of Euler steps, for decoders that have one."""


@runtime_checkable
class StreamingCodec(SpeechCodec, Protocol):
    def stream(self, codes: Sequence[int], prompt: VoicePrompt, flow_steps: int, blocks: Sequence[int],
               lookahead: Sequence[int], crossfade_s: float) -> Iterator[np.ndarray]:
        """Audio in pieces, as blocks of codes become ready."""


@dataclass
class FlowCondition:
    mel: torch.Tensor  # [frames, 80] 24 kHz log-mel of the prompt (50 frames/s, about two per code)
    speaker: torch.Tensor  # [192] CAM++ embedding


class GLMTTSCodec:
    """Whisper-VQ speech tokenizer, flow matching (tokens -> mel, prompt-conditioned) and HiFT, as released."""

    sample_rate = 24000

    def __init__(self, speech_tokenizer: SpeechTokenizer, flow: FlowMatching, vocoder: HiFT, speaker: CampPlus,
                 rows_per_call: int = 64) -> None:
        """``rows_per_call``: utterances the flow and the vocoder decode at once (memory grows with it)."""
        if rows_per_call < 1:
            raise ValueError(f"rows_per_call must be >= 1, got {rows_per_call}")
        self.speech_tokenizer, self.flow, self.vocoder, self.speaker = speech_tokenizer, flow, vocoder, speaker
        self.rows_per_call = rows_per_call
        self.num_codes = speech_tokenizer.encoder.config.quantize_vocab_size

    @classmethod
    def from_pretrained(cls, ckpt: str | Path, device: str = "cpu") -> GLMTTSCodec:
        ckpt = Path(ckpt)
        return cls(SpeechTokenizer.from_pretrained(ckpt / "speech_tokenizer", device),
                   FlowMatching.from_pretrained(ckpt / "flow", device), HiFT.from_pretrained(ckpt / "hift", device),
                   CampPlus(ckpt / "frontend" / "campplus.onnx"))

    def tokenize(self, audio: np.ndarray, sample_rate: int) -> list[int]:
        return self.speech_tokenizer([to_model_rate(audio, sample_rate, 16000)])[0]

    def encode_prompt(self, audio: np.ndarray, sample_rate: int) -> tuple[list[int], FlowCondition]:
        audio16 = to_model_rate(audio, sample_rate, 16000)
        codes = self.speech_tokenizer([audio16])[0]
        if not codes:
            raise ValueError("the prompt audio is too short to give any speech token")
        # as released, every code and every mel frame is kept (3.3 s: 83 codes, 165 frames); the flow places the
        # prompt's frames and drops as many from its output
        mel = log_mel(torch.from_numpy(to_model_rate(audio, sample_rate, self.sample_rate)), MEL_24K).T
        return codes, FlowCondition(mel, torch.from_numpy(self.speaker(audio16)).float())

    def _flow_input(self, codes: Sequence[int], prompt: VoicePrompt) -> FlowInput:
        return FlowInput(torch.tensor(codes), torch.tensor(prompt.codes), prompt.condition.mel,
                         prompt.condition.speaker)

    def decode(self, codes: Sequence[Sequence[int]], prompts: Sequence[VoicePrompt], flow_steps: int = 10
               ) -> list[np.ndarray]:
        """Flow and vocoder each run once per ``rows_per_call`` utterances, on the models' device; rows are
        grouped by length so that little is padded. On CUDA the flow runs in bfloat16 (its ODE state in float32).

        A row decoded beside longer ones matches its decoding alone up to float error, except in its last 8 or so
        mel frames (0.17 s), which the vocoder's convolutions see the padding from (its excitation noise is random
        either way)."""
        index = sorted((i for i, c in enumerate(codes) if len(c)), key=lambda i: len(codes[i]))
        audio: list[np.ndarray] = [np.zeros(0, dtype=np.float32) for _ in codes]
        device = next(self.flow.parameters()).device
        for start in range(0, len(index), self.rows_per_call):
            rows = index[start:start + self.rows_per_call]
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                mels = self.flow.generate([self._flow_input(codes[i], prompts[i]) for i in rows], steps=flow_steps)
            for i, samples in zip(rows, self.vocoder.batch([mel.float() for mel in mels]), strict=True):
                audio[i] = samples.cpu().numpy()
        return audio

    def stream(self, codes: Sequence[int], prompt: VoicePrompt, flow_steps: int, blocks: Sequence[int],
               lookahead: Sequence[int], crossfade_s: float) -> Iterator[np.ndarray]:
        """Blocks of ``blocks`` tokens (the last size repeating), each block's mel computed with a look-ahead of
        tokens past its end and the same starting noise, joined with a short cross-fade."""
        hop = MEL_24K.hop
        fade = int(crossfade_s * self.sample_rate)
        noise = torch.randn(self.flow.frames_for(len(prompt.codes) + len(codes)), self.flow.cfg.mel_dim)
        start, k, held = 0, 0, None
        while start < len(codes):
            size = blocks[min(k, len(blocks) - 1)]
            end = min(start + size, len(codes))
            ahead = min(end + lookahead[min(k, len(lookahead) - 1)], len(codes))
            mel = self.flow.generate([self._flow_input(codes[:ahead], prompt)], steps=flow_steps, noise=[noise])[0]
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


class MelUnitCodec:
    """k-means mel units decoded by Griffin-Lim (:mod:`mel_units`): the demo TTS's codec. The voice lives in the
    codes themselves, so decoding needs nothing from the prompt but its codes, which the LM already saw."""

    def __init__(self, units: MelUnits) -> None:
        self.units = units
        self.sample_rate = units.cfg.sample_rate
        self.num_codes = units.cfg.num_codes

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> MelUnitCodec:
        return cls(MelUnits.load(folder))

    def tokenize(self, audio: np.ndarray, sample_rate: int) -> list[int]:
        return self.units.encode(to_model_rate(audio, sample_rate, self.sample_rate))

    def encode_prompt(self, audio: np.ndarray, sample_rate: int) -> tuple[list[int], None]:
        codes = self.tokenize(audio, sample_rate)
        if not codes:
            raise ValueError("the prompt audio is too short to give any speech code")
        return codes, None

    def decode(self, codes: Sequence[Sequence[int]], prompts: Sequence[VoicePrompt], flow_steps: int = 10
               ) -> list[np.ndarray]:
        if len(codes) != len(prompts):
            raise ValueError(f"{len(codes)} code sequences for {len(prompts)} prompts")
        return self.units.decode_batch(codes)
