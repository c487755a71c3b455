"""The speech tokenizer: a Whisper encoder cut at a vector-quantisation layer (GLM-4-Voice "WhisperVQ").

16 kHz audio -> Whisper log-mel -> two convolutions (50 frames/s) -> the first ``quantize_position`` Whisper encoder
layers (block-causal attention), with pooling after layer ``pooling_position`` (to 25 Hz for GLM-TTS) -> nearest
codeword (L2) of a ``quantize_vocab_size``-entry codebook. The published folder is a Hugging Face folder:
``config.json`` (Whisper config plus the VQ fields below), ``model*.safetensors`` with the encoder's own names
(``conv1``, ``layers.N.self_attn.q_proj`` ..., ``codebook``), ``preprocessor_config.json``. Encoder layers are
transformers' own ``WhisperEncoderLayer``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers import WhisperConfig, WhisperFeatureExtractor
from transformers.models.whisper.modeling_whisper import WhisperEncoderLayer

from .checkpoint_io import load_strict

SAMPLE_RATE = 16000
SEGMENT_SECONDS = 30


def vq_setting(config: WhisperConfig, name: str, default=None):
    return getattr(config, name, default)


def block_causal_mask(keep: torch.Tensor, block: int | None, dtype: torch.dtype) -> torch.Tensor:
    """Additive ``[B, 1, T, T]`` mask: a frame sees every earlier frame and its own block, never padding."""
    t = keep.shape[1]
    if block:
        causal = torch.tril(torch.ones(t, t, dtype=torch.bool, device=keep.device))
        blocks = torch.block_diag(*[torch.ones(min(block, t - s), min(block, t - s), dtype=torch.bool)
                                    for s in range(0, t, block)]).to(keep.device)
        allowed = (causal | blocks)[None] & keep[:, None, :]
    else:
        allowed = keep[:, None, :].expand(-1, t, -1)
    return ((~allowed).to(dtype) * torch.finfo(dtype).min).unsqueeze(1)


class WhisperVQEncoder(nn.Module):
    def __init__(self, config: WhisperConfig) -> None:
        super().__init__()
        if vq_setting(config, "quantize_vocab_size") is None:
            raise ValueError("config.json has no quantize_vocab_size: not a Whisper-VQ speech tokenizer")
        self.config = config
        d = config.d_model
        self.conv1 = nn.Conv1d(config.num_mel_bins, d, kernel_size=3, padding=1)
        self.conv2 = nn.Conv1d(d, d, kernel_size=3, stride=2, padding=1)
        self.embed_positions = nn.Embedding(config.max_source_positions, d)
        self.quantize_position = vq_setting(config, "quantize_position", 16)
        encoder_only = vq_setting(config, "quantize_encoder_only", False)
        depth = self.quantize_position if encoder_only else config.encoder_layers
        config._attn_implementation = "eager"
        self.layers = nn.ModuleList(WhisperEncoderLayer(config) for _ in range(depth))
        if not encoder_only:
            self.layer_norm = nn.LayerNorm(d)
        self.pool_kernel = vq_setting(config, "pooling_kernel_size")
        self.pooling_position = vq_setting(config, "pooling_position", 0)
        pool_type = vq_setting(config, "pooling_type", "max")
        if pool_type not in ("max", "avg"):
            raise ValueError(f"pooling_type must be 'max' or 'avg', got {pool_type!r}")
        self.pool = (nn.MaxPool1d if pool_type == "max" else nn.AvgPool1d)(self.pool_kernel) if self.pool_kernel \
            else None
        self.codebook = nn.Embedding(config.quantize_vocab_size, d)
        pooled_positions = math.ceil(config.max_source_positions / (self.pool_kernel or 1))
        self.embed_positions2 = nn.Embedding(pooled_positions, d)  # used by the decoder side only; kept to load
        self.block = vq_setting(config, "quantize_causal_block_size")

    @property
    def frames_per_token(self) -> int:
        """Whisper mel frames (100/s) per output token."""
        return 2 * (self.pool_kernel or 1)

    @torch.no_grad()
    def forward(self, features: torch.Tensor, feature_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``[B, mel, frames]`` Whisper features and their ``[B, frames]`` mask -> codes ``[B, T]`` and their mask."""
        keep = feature_mask[:, ::2].bool()
        x = F.gelu(self.conv2(F.gelu(self.conv1(features)))).transpose(1, 2)
        x = x + self.embed_positions.weight[: x.shape[1]]
        keep = keep[:, : x.shape[1]]
        block = self.block
        mask = block_causal_mask(keep, block, x.dtype)
        for index, layer in enumerate(self.layers, start=1):
            x = layer(x, mask)
            if isinstance(x, tuple):
                x = x[0]
            if self.pool is not None and index == self.pooling_position:
                k = self.pool_kernel
                x = x.transpose(1, 2)
                if x.shape[-1] % k:
                    x = F.pad(x, (0, k - x.shape[-1] % k))
                x = self.pool(x).transpose(1, 2)
                keep = keep[:, ::k]
                block = block // k if block else None
                mask = block_causal_mask(keep, block, x.dtype)
            if index == self.quantize_position:
                break
        distances = (x.pow(2).sum(-1, keepdim=True) - 2 * x @ self.codebook.weight.T
                     + self.codebook.weight.pow(2).sum(-1))
        return distances.argmin(-1), keep


class SpeechTokenizer:
    """Audio -> 25 Hz speech codes, batched, in 30 s segments."""

    def __init__(self, encoder: WhisperVQEncoder, extractor: WhisperFeatureExtractor, device: str = "cpu") -> None:
        self.encoder, self.extractor, self.device = encoder.to(device).eval(), extractor, device

    @classmethod
    def from_pretrained(cls, folder: str | Path, device: str = "cpu") -> SpeechTokenizer:
        from safetensors.torch import load_file

        folder = Path(folder)
        config_path = folder / "config.json"
        if not config_path.is_file():
            raise FileNotFoundError(f"{config_path} is missing: not a speech tokenizer folder")
        config = WhisperConfig(**json.loads(config_path.read_text()))
        encoder = WhisperVQEncoder(config)
        files = sorted(folder.glob("model*.safetensors"))
        if not files:
            raise FileNotFoundError(f"no model*.safetensors in {folder}")
        state: dict[str, torch.Tensor] = {}
        for file in files:
            state.update(load_file(str(file)))
        load_strict(encoder, {k.removeprefix("encoder."): v for k, v in state.items()}, files[0])
        return cls(encoder, WhisperFeatureExtractor.from_pretrained(str(folder)), device)

    def __call__(self, audios: Sequence[np.ndarray]) -> list[list[int]]:
        """16 kHz mono float audio -> codes per utterance (longer than 30 s: segment by segment)."""
        segment = SAMPLE_RATE * SEGMENT_SECONDS
        pieces, owner = [], []
        for i, audio in enumerate(audios):
            for start in range(0, max(len(audio), 1), segment):
                pieces.append(np.asarray(audio[start:start + segment], dtype=np.float32))
                owner.append(i)
        features = self.extractor(pieces, sampling_rate=SAMPLE_RATE, return_attention_mask=True,
                                  return_tensors="pt", padding="max_length")
        codes, keep = self.encoder(features.input_features.to(self.device),
                                   features.attention_mask.to(self.device))
        out: list[list[int]] = [[] for _ in audios]
        for i, row, mask in zip(owner, codes.tolist(), keep.tolist()):
            out[i].extend(c for c, m in zip(row, mask) if m)
        return out
