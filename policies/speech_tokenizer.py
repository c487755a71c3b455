"""The speech tokenizer: a Whisper encoder cut at a vector-quantisation layer (GLM-4-Voice "WhisperVQ").

16 kHz audio -> Whisper log-mel -> two convolutions (50 frames/s) -> the first ``quantize_position`` Whisper encoder
layers, with pooling after layer ``pooling_position`` (to 25 Hz for GLM-TTS) -> nearest codeword (L2) of a
``quantize_vocab_size``-entry codebook. Encoder layers are transformers' own ``WhisperEncoderLayer``.

The config's causal flags are honoured as in GLM-4-Voice's model code: ``encoder_causal_convolution`` pads both
convolutions on the left only (GLM-4-Voice's tokenizer sets it); ``encoder_causal_attention`` or
``quantize_causal_encoder`` makes every kept layer plainly causal (no block or padding mask); otherwise
``quantize_causal_block_size`` gives block-causal attention, and without it every frame sees every other.

The published folder is a Hugging Face folder: ``config.json`` (Whisper config plus the VQ fields), safetensors and
``preprocessor_config.json``. The weights come in the release's layout, the full model's ``model.encoder.*`` keys
(the decoder, the encoder's final layer norm and the layers past ``quantize_position`` are not used), or as the
encoder's own names (what :func:`~vocalign.policies.checkpoints.write_speech_tokenizer` writes).
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

from ..common.weights import load_strict

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


def causal_mask(t: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Additive ``[1, 1, T, T]`` lower-triangular mask (causal layers ignore padding and blocks, as released)."""
    future = torch.ones(t, t, dtype=torch.bool, device=device).triu(1)
    return (future.to(dtype) * torch.finfo(dtype).min)[None, None]


class WhisperVQEncoder(nn.Module):
    """The encoder up to the quantiser (the release builds it the same way: ``quantize_encoder_only``)."""

    def __init__(self, config: WhisperConfig) -> None:
        super().__init__()
        if vq_setting(config, "quantize_vocab_size") is None:
            raise ValueError("config.json has no quantize_vocab_size: not a Whisper-VQ speech tokenizer")
        self.config = config
        d = config.d_model
        self.causal_conv = bool(vq_setting(config, "encoder_causal_convolution", False))
        padding = 0 if self.causal_conv else 1  # causal: two frames of left padding in forward
        self.conv1 = nn.Conv1d(config.num_mel_bins, d, kernel_size=3, padding=padding)
        self.conv2 = nn.Conv1d(d, d, kernel_size=3, stride=2, padding=padding)
        self.embed_positions = nn.Embedding(config.max_source_positions, d)
        self.quantize_position = vq_setting(config, "quantize_position", 16)
        config._attn_implementation = "eager"
        self.layers = nn.ModuleList(WhisperEncoderLayer(config) for _ in range(self.quantize_position))
        self.causal_attention = bool(vq_setting(config, "encoder_causal_attention", False)
                                     or vq_setting(config, "quantize_causal_encoder", False))
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

    def _conv(self, conv: nn.Conv1d, x: torch.Tensor) -> torch.Tensor:
        return conv(F.pad(x, (2, 0)) if self.causal_conv else x)

    def _mask(self, keep: torch.Tensor, block: int | None, dtype: torch.dtype) -> torch.Tensor:
        if self.causal_attention:
            return causal_mask(keep.shape[1], dtype, keep.device)
        return block_causal_mask(keep, block, dtype)

    @torch.no_grad()
    def forward(self, features: torch.Tensor, feature_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``[B, mel, frames]`` Whisper features and their ``[B, frames]`` mask -> codes ``[B, T]`` and their mask."""
        keep = feature_mask[:, ::2].bool()
        x = F.gelu(self._conv(self.conv2, F.gelu(self._conv(self.conv1, features)))).transpose(1, 2)
        x = x + self.embed_positions.weight[: x.shape[1]]
        keep = keep[:, : x.shape[1]]
        block = self.block
        mask = self._mask(keep, block, x.dtype)
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
                mask = self._mask(keep, block, x.dtype)
        distances = (x.pow(2).sum(-1, keepdim=True) - 2 * x @ self.codebook.weight.T
                     + self.codebook.weight.pow(2).sum(-1))
        return distances.argmin(-1), keep


RELEASED_PREFIX = "model.encoder."
# training-only state of the release's encoder (its codebook's moving averages), not needed to encode
_TRAINING_ONLY = ("ema_count", "ema_weight")


def encoder_state(state: dict[str, torch.Tensor], quantize_position: int) -> dict[str, torch.Tensor]:
    """The encoder's weights from a speech tokenizer's safetensors in either layout. In the release's layout
    (``model.encoder.*``) the final layer norm, the layers from ``quantize_position`` on and the codebook's
    training averages are left out, as the release's loader does; other keys (the decoder) are not the encoder's."""
    if not any(key.startswith(RELEASED_PREFIX) for key in state):
        return {key.removeprefix("encoder."): value for key, value in state.items()}
    kept = {}
    for key, value in state.items():
        if not key.startswith(RELEASED_PREFIX):
            continue
        name = key[len(RELEASED_PREFIX):]
        if name.startswith("layer_norm.") or name in _TRAINING_ONLY:
            continue
        if name.startswith("layers.") and int(name.split(".")[1]) >= quantize_position:
            continue
        kept[name] = value
    return kept


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
        load_strict(encoder, encoder_state(state, encoder.quantize_position), files[0] if len(files) == 1 else folder)
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
