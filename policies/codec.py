"""Speech in and out of the speech LM's codes: the stages around the LM, behind one interface.

A two-stage TTS is a speech LM between a speech tokenizer (prompt audio -> codes) and a token-to-audio decoder
(codes -> audio, conditioned on the voice prompt). GLM-TTS's are a Whisper-VQ tokenizer, flow matching with CAM++
speaker embeddings, and HiFT at 24 kHz or Vocos2D at 32 kHz (:class:`GLMTTSCodec`); vocalign's CPU demo uses
k-means mel units and Griffin-Lim (:class:`MelUnitCodec`). The pipeline, the rollout environment and the trainer
see only :class:`SpeechCodec`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch

from ..common.audio import to_model_rate
from .flow import FlowInput, FlowMatching
from .mel import MEL_24K, MEL_32K, MelConfig, log_mel
from .mel_units import MelUnits
from .speaker import CampPlus
from .speech_tokenizer import SpeechTokenizer
from .streaming import PROMPT_BLOCK_TOKENS, Stitcher, block_ends, settled_frames
from .vocoder import HiFT
from .vocos2d import Vocos2DTorchScript

Vocoder = HiFT | Vocos2DTorchScript
# the released vocoders by output rate, the file each needs, and the mel settings of the prompt condition
VOCODER_FILES = {24000: "hift/hift.pt", 32000: "vocos2d/generator_jit.ckpt"}
PROMPT_MEL = {24000: MEL_24K, 32000: MEL_32K}


def checkpoint_sample_rate(ckpt: str | Path, sample_rate: int | None = None) -> int:
    """The output rate a checkpoint is decoded at, as the release chooses it: its ``sample_rate`` (24000 -> HiFT,
    32000 -> Vocos2D) when asked for, else 24 kHz (the release's default) when ``hift/`` is there, else 32 kHz when
    ``vocos2d/`` is. The vocoder file for the rate must be present."""
    ckpt = Path(ckpt)
    if sample_rate is None:
        present = [rate for rate, file in VOCODER_FILES.items() if (ckpt / file).is_file()]
        if not present:
            raise FileNotFoundError(f"{ckpt} has no vocoder: expected {' or '.join(VOCODER_FILES.values())}")
        return present[0]
    if sample_rate not in VOCODER_FILES:
        raise ValueError(f"sample_rate {sample_rate} is not one of the released vocoders' rates "
                         f"{sorted(VOCODER_FILES)} (24000: HiFT, 32000: Vocos2D)")
    if not (ckpt / VOCODER_FILES[sample_rate]).is_file():
        others = [f"{rate} ({file})" for rate, file in VOCODER_FILES.items() if (ckpt / file).is_file()]
        raise FileNotFoundError(f"{sample_rate} Hz output needs {ckpt / VOCODER_FILES[sample_rate]}, which is "
                                "missing; " + (f"this checkpoint has {', '.join(others)}" if others
                                               else "nor is any other vocoder there"))
    return sample_rate


def load_vocoder(ckpt: str | Path, sample_rate: int, device: str = "cpu") -> Vocoder:
    """The vocoder for ``sample_rate`` (checked by :func:`checkpoint_sample_rate`)."""
    ckpt = Path(ckpt)
    if checkpoint_sample_rate(ckpt, sample_rate) == 32000:
        return Vocos2DTorchScript(ckpt / VOCODER_FILES[32000], device)
    return HiFT.from_pretrained(ckpt / "hift", device)


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
    mel: torch.Tensor  # [frames, 80] log-mel of the prompt at the output rate's settings (50 frames/s, two per code)
    speaker: torch.Tensor  # [192] CAM++ embedding


class GLMTTSCodec:
    """Whisper-VQ speech tokenizer, flow matching (tokens -> mel, prompt-conditioned) and a vocoder (HiFT, 24 kHz,
    or Vocos2D, 32 kHz), as released. The flow's mel is 50 frames/s either way; the prompt's mel condition is taken
    with the output rate's settings, as the release's ``load_frontends`` does."""

    def __init__(self, speech_tokenizer: SpeechTokenizer, flow: FlowMatching, vocoder: Vocoder, speaker: CampPlus,
                 rows_per_call: int = 64) -> None:
        """``rows_per_call``: utterances the flow and the vocoder decode at once (memory grows with it)."""
        if rows_per_call < 1:
            raise ValueError(f"rows_per_call must be >= 1, got {rows_per_call}")
        self.speech_tokenizer, self.flow, self.vocoder, self.speaker = speech_tokenizer, flow, vocoder, speaker
        self.rows_per_call = rows_per_call
        self.num_codes = speech_tokenizer.encoder.config.quantize_vocab_size
        self.sample_rate = vocoder.sample_rate
        self.prompt_mel: MelConfig = PROMPT_MEL[self.sample_rate]

    @classmethod
    def from_pretrained(cls, ckpt: str | Path, device: str = "cpu", sample_rate: int | None = None) -> GLMTTSCodec:
        """``sample_rate``: 24000 (HiFT) or 32000 (Vocos2D); None picks as :func:`checkpoint_sample_rate`."""
        ckpt = Path(ckpt)
        vocoder = load_vocoder(ckpt, checkpoint_sample_rate(ckpt, sample_rate), device)
        return cls(SpeechTokenizer.from_pretrained(ckpt / "speech_tokenizer", device),
                   FlowMatching.from_pretrained(ckpt / "flow", device), vocoder,
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
        mel = log_mel(torch.from_numpy(to_model_rate(audio, sample_rate, self.sample_rate)), self.prompt_mel).T
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
        """The release's ``token2wav_stream`` (:mod:`vocalign.policies.streaming`): after each block of ``blocks``
        tokens, a cached block-causal flow pass over all tokens so far and the vocoder over its whole mel; the audio
        before the look-ahead (``lookahead`` tokens, per block) and a ``crossfade_s`` fade is emitted."""
        if len(blocks) != len(lookahead):
            raise ValueError(f"one look-ahead per block size: got blocks {list(blocks)} and look-ahead "
                             f"{list(lookahead)}")
        if not prompt.codes:
            raise ValueError("streaming needs a voice prompt with speech codes, as released")
        ends = block_ends(len(codes), blocks)
        stitcher, cache = Stitcher(self.sample_rate, crossfade_s), None
        pattern = [PROMPT_BLOCK_TOKENS, *blocks]
        hop = self.sample_rate // int(self.flow.cfg.mel_framerate)
        for k, end in enumerate(ends):
            mel, cache = self.flow.generate_streaming(self._flow_input(codes[:end], prompt), flow_steps, pattern,
                                                      cache)
            audio = self.vocoder(mel[None].float())[0].cpu().numpy()
            ahead = lookahead[min(k, len(lookahead) - 1)]
            cache.settled_frames = settled_frames(len(audio), ahead, self.flow.cfg.input_frame_rate,
                                                  self.sample_rate, hop)
            yield stitcher.add(audio, ahead / self.flow.cfg.input_frame_rate, last=k == len(ends) - 1)


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
