"""Stage 2a of GLM-TTS: flow matching from speech tokens to a mel spectrogram (an F5-TTS-style DiT).

The network follows the published checkpoint module for module, so ``flow/flow.pt`` loads by name:
``estimator.time_embed``, ``estimator.text_emb_layer`` (token embedding, sin/cos positions, ConvNeXt-V2 blocks),
``estimator.emb_concator`` (input projection + convolutional position embedding), ``estimator.rotary_embed``,
``estimator.transformer_blocks`` (AdaLN-Zero, rotary attention, tanh-GELU feed-forward), ``estimator.norm_out``,
``estimator.proj_out`` and, when the speaker embedding is also concatenated to the condition,
``spk_embed_affine_layer``.

Sampling integrates the learned velocity with Euler steps on the cosine schedule t = 1 - cos(pi/2 * s), with
classifier-free guidance v = (1 + w) v_cond - w v_uncond (w = 0.7; the unconditional pass zeroes the prompt mel,
the speaker embedding and the tokens). Utterances of different lengths are batched with a key padding mask, and the
conditional and unconditional passes share one forward.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import yaml
from torch import nn
from x_transformers.x_transformers import RotaryEmbedding, apply_rotary_pos_emb


# ---------------------------------------------------------------------------------------------------- configuration
@dataclass
class FlowConfig:
    speech_token_dim: int = 512
    vocab_size: int = 100000
    input_frame_rate: float = 25.0
    mel_framerate: float = 50.0
    spk_embed_dim: int = 80
    mel_dim: int = 80
    big_model: bool = False
    spkr_emb_adaLN: bool = True
    speech_token_cfg: bool = True
    use_wavlm_emb: bool = False
    remove_spkr_concat_condition: bool = True
    t_scheduler: str = "cosine"
    inference_cfg_rate: float = 0.7
    # Not in the release (which picks sizes with big_model); lets the tiny checkpoint be tiny.
    trans_dim: int | None = None
    depth: int | None = None
    heads: int | None = None
    dim_head: int = 64
    conv_layers: int = 4
    ff_mult: int = 2

    def __post_init__(self) -> None:
        if self.t_scheduler not in ("cosine", "linear"):
            raise ValueError(f"flow t_scheduler must be 'cosine' or 'linear', got {self.t_scheduler!r}")

    @property
    def dit_sizes(self) -> tuple[int, int, int]:
        default = (1024, 22, 16) if self.big_model else (768, 18, 12)
        return (self.trans_dim or default[0], self.depth or default[1], self.heads or default[2])


# Keys of the released config that only matter for training.
_TRAINING_ONLY = {"calc_prompt_mel_loss", "loss_type", "use_mdt"}


class _TagTolerantLoader(yaml.SafeLoader):
    """Reads hyperpyyaml-style ``!new:pkg.Class`` tags as plain mappings; nothing is imported or run."""


def _construct_tagged(loader: yaml.SafeLoader, suffix: str, node: yaml.Node) -> Any:
    if isinstance(node, yaml.MappingNode):
        return loader.construct_mapping(node, deep=True)
    if isinstance(node, yaml.SequenceNode):
        return loader.construct_sequence(node, deep=True)
    return loader.construct_scalar(node)


_TagTolerantLoader.add_multi_constructor("!", _construct_tagged)


def read_flow_config(path: str | Path) -> FlowConfig:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"flow config {path} does not exist")
    data = yaml.load(path.read_text(), Loader=_TagTolerantLoader) or {}
    if isinstance(data.get("flow"), dict):
        data = data["flow"]
    known = {f.name for f in fields(FlowConfig)}
    unknown = sorted(set(data) - known - _TRAINING_ONLY)
    if unknown:
        raise ValueError(f"{path}: unknown flow settings {unknown}")
    return FlowConfig(**{k: v for k, v in data.items() if k in known})


# ---------------------------------------------------------------------------------------------------- building blocks
def sinusoidal_embedding(t: torch.Tensor, dim: int, scale: float = 1000.0) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(torch.arange(half, device=t.device).float() * -(math.log(10000) / (half - 1)))
    angles = scale * t.unsqueeze(1) * freqs.unsqueeze(0)
    return torch.cat((angles.sin(), angles.cos()), dim=-1)


def absolute_positions(dim: int, length: int, theta: float = 10000.0) -> torch.Tensor:
    """cos/sin table added to the token embeddings (the release precomputes 4096 positions)."""
    freqs = 1.0 / (theta ** (torch.arange(0, dim, 2)[: dim // 2].float() / dim))
    angles = torch.outer(torch.arange(length).float(), freqs)
    return torch.cat([angles.cos(), angles.sin()], dim=-1)


class TimestepEmbedding(nn.Module):
    def __init__(self, dim: int, freq_dim: int = 256) -> None:
        super().__init__()
        self.freq_dim = freq_dim
        self.time_mlp = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.time_mlp(sinusoidal_embedding(t, self.freq_dim))


class GRN(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.zeros(1, 1, dim))
        self.beta = nn.Parameter(torch.zeros(1, 1, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gx = torch.norm(x, p=2, dim=1, keepdim=True)
        return self.gamma * (x * (gx / (gx.mean(dim=-1, keepdim=True) + 1e-6))) + self.beta + x


class ConvNeXtV2Block(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.dwconv = nn.Conv1d(dim, dim, kernel_size=7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, hidden)
        self.grn = GRN(hidden)
        self.pwconv2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        y = self.dwconv((x * keep).transpose(1, 2)).transpose(1, 2)
        return x + self.pwconv2(self.grn(F.gelu(self.pwconv1(self.norm(y)))))


class TokenEmbedding(nn.Module):
    """25 Hz tokens nearest-neighbour stretched to the mel frame rate, embedded, positioned, ConvNeXt-refined."""

    max_positions = 4096

    def __init__(self, vocab_size: int, dim: int, conv_layers: int, mult: int = 2) -> None:
        super().__init__()
        self.text_embed = nn.Embedding(vocab_size + 1, dim)
        self.register_buffer("positions", absolute_positions(dim, self.max_positions), persistent=False)
        self.text_blocks = nn.Sequential(*[ConvNeXtV2Block(dim, dim * mult) for _ in range(conv_layers)])

    def forward(self, tokens: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """``tokens`` already stretched to the frame rate, ``[B, T]``; ``keep`` ``[B, T, 1]``."""
        x = self.text_embed(tokens)
        x = x + self.positions[torch.arange(x.shape[1], device=x.device).clamp(max=self.max_positions - 1)]
        for block in self.text_blocks:
            x = block(x, keep)
        return x


class ConvPositionEmbedding(nn.Module):
    def __init__(self, dim: int, kernel: int = 31, groups: int = 16) -> None:
        super().__init__()
        self.conv1d = nn.Sequential(nn.Conv1d(dim, dim, kernel, groups=groups, padding=kernel // 2), nn.Mish(),
                                    nn.Conv1d(dim, dim, kernel, groups=groups, padding=kernel // 2), nn.Mish())

    def forward(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """Padding is zeroed before each convolution, so a padded utterance sees what it would see alone."""
        conv_a, act_a, conv_b, act_b = self.conv1d
        keep = keep.transpose(1, 2)
        y = act_a(conv_a(x.transpose(1, 2) * keep))
        return act_b(conv_b(y * keep)).transpose(1, 2)


class InputProjection(nn.Module):
    def __init__(self, in_dim: int, dim: int) -> None:
        super().__init__()
        self.proj = nn.Linear(in_dim, dim)
        self.conv_pos_embed = ConvPositionEmbedding(dim)

    def forward(self, x: torch.Tensor, cond: torch.Tensor, tokens: torch.Tensor, keep: torch.Tensor
                ) -> torch.Tensor:
        x = self.proj(torch.cat((x, cond, tokens), dim=-1))
        return self.conv_pos_embed(x, keep) + x


class AdaLayerNormZero(nn.Module):
    def __init__(self, dim: int, extra: int, chunks: int) -> None:
        super().__init__()
        self.linear = nn.Linear(dim + extra, dim * chunks)
        self.chunks = chunks

    def forward(self, emb: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return torch.chunk(self.linear(F.silu(emb)), self.chunks, dim=1)


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, dim_head: int) -> None:
        super().__init__()
        self.heads = heads
        inner = heads * dim_head
        self.to_q, self.to_k, self.to_v = nn.Linear(dim, inner), nn.Linear(dim, inner), nn.Linear(dim, inner)
        self.to_out = nn.ModuleList([nn.Linear(inner, dim), nn.Dropout(0.0)])

    def forward(self, x: torch.Tensor, rope: torch.Tensor, attn_mask: torch.Tensor | None) -> torch.Tensor:
        b = x.shape[0]
        # as released: rotary applied to the projected vector before the head split (it rotates its first dim_head)
        q = apply_rotary_pos_emb(self.to_q(x), rope)
        k = apply_rotary_pos_emb(self.to_k(x), rope)
        v = self.to_v(x)
        q, k, v = (t.view(b, -1, self.heads, t.shape[-1] // self.heads).transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        return self.to_out[0](out.transpose(1, 2).reshape(b, -1, q.shape[1] * q.shape[-1]))


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int) -> None:
        super().__init__()
        self.ff = nn.Sequential(nn.Sequential(nn.Linear(dim, dim * mult), nn.GELU(approximate="tanh")),
                                nn.Dropout(0.0), nn.Linear(dim * mult, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ff(x)


class DiTBlock(nn.Module):
    def __init__(self, dim: int, heads: int, dim_head: int, ff_mult: int, extra: int) -> None:
        super().__init__()
        self.attn_norm = AdaLayerNormZero(dim, extra, 6)
        self.attn = Attention(dim, heads, dim_head)
        self.ff = FeedForward(dim, ff_mult)

    def forward(self, x: torch.Tensor, emb: torch.Tensor, keep: torch.Tensor, rope: torch.Tensor,
                attn_mask: torch.Tensor | None) -> torch.Tensor:
        shift_a, scale_a, gate_a, shift_f, scale_f, gate_f = self.attn_norm(emb)
        h = F.layer_norm(x, x.shape[-1:], eps=1e-6) * (1 + scale_a[:, None]) + shift_a[:, None]
        x = x + gate_a[:, None] * (self.attn(h, rope, attn_mask) * keep)
        h = F.layer_norm(x, x.shape[-1:], eps=1e-6) * (1 + scale_f[:, None]) + shift_f[:, None]
        return x + gate_f[:, None] * self.ff(h)


class DiT(nn.Module):
    def __init__(self, cfg: FlowConfig) -> None:
        super().__init__()
        dim, depth, heads = cfg.dit_sizes
        spk_dim = (192 + (256 if cfg.use_wavlm_emb else 0)) if cfg.spkr_emb_adaLN else 0
        condition_dim = cfg.mel_dim if cfg.remove_spkr_concat_condition else cfg.mel_dim + cfg.spk_embed_dim
        self.time_embed = TimestepEmbedding(dim)
        self.text_emb_layer = TokenEmbedding(cfg.vocab_size, cfg.speech_token_dim, cfg.conv_layers)
        self.emb_concator = InputProjection(cfg.mel_dim + cfg.speech_token_dim + condition_dim, dim)
        self.rotary_embed = RotaryEmbedding(cfg.dim_head)
        self.transformer_blocks = nn.ModuleList(DiTBlock(dim, heads, cfg.dim_head, cfg.ff_mult, spk_dim)
                                                for _ in range(depth))
        self.norm_out = AdaLayerNormZero(dim, spk_dim, 2)
        self.proj_out = nn.Linear(dim, cfg.mel_dim)

    def forward(self, x: torch.Tensor, cond: torch.Tensor, tokens: torch.Tensor, t: torch.Tensor,
                keep: torch.Tensor, spk: torch.Tensor | None, block_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Velocity ``[B, T, mel]``. ``tokens`` are stretched to the frames; ``keep`` is ``[B, T]`` bool (False on
        padding); ``block_mask`` ``[T, T]`` bool limits what each frame attends to (streaming)."""
        emb = self.time_embed(t)
        if spk is not None:
            emb = torch.cat([emb, spk], dim=-1)
        keep3 = keep.unsqueeze(-1).to(x.dtype)
        h = self.emb_concator(x, cond, self.text_emb_layer(tokens, keep3), keep3)
        rope, _ = self.rotary_embed.forward_from_seq_len(x.shape[1])
        attn_mask = None if bool(keep.all()) else keep[:, None, None, :]
        if block_mask is not None:
            attn_mask = block_mask[None, None] if attn_mask is None else attn_mask & block_mask[None, None]
        for block in self.transformer_blocks:
            h = block(h, emb, keep3, rope, attn_mask)
        scale, shift = self.norm_out(emb)
        h = F.layer_norm(h, h.shape[-1:], eps=1e-6) * (1 + scale)[:, None] + shift[:, None]
        return self.proj_out(h)


# ---------------------------------------------------------------------------------------------------- the model
@dataclass
class FlowInput:
    tokens: torch.Tensor  # [N] new speech tokens (codes)
    prompt_tokens: torch.Tensor  # [P] speech tokens of the voice prompt
    prompt_mel: torch.Tensor  # [frames, mel] log-mel of the voice prompt
    speaker: torch.Tensor  # [192] CAM++ embedding of the voice prompt


class FlowMatching(nn.Module):
    def __init__(self, cfg: FlowConfig) -> None:
        super().__init__()
        self.cfg = cfg
        if not cfg.remove_spkr_concat_condition:
            self.spk_embed_affine_layer = nn.Linear(192, cfg.spk_embed_dim)
        self.estimator = DiT(cfg)

    @classmethod
    def from_pretrained(cls, folder: str | Path, device: str = "cpu") -> FlowMatching:
        """``flow/config.yaml`` + ``flow/flow.pt`` (a state dict, raw or under ``"model"``), loaded strictly."""
        from ..common.weights import load_torch_state

        folder = Path(folder)
        model = cls(read_flow_config(folder / "config.yaml"))
        load_torch_state(model, folder / "flow.pt")
        return model.to(device).eval()

    def frames_for(self, num_tokens: int) -> int:
        return int(num_tokens / self.cfg.input_frame_rate * self.cfg.mel_framerate)

    def _conditions(self, items: Sequence[FlowInput]) -> tuple[torch.Tensor, ...]:
        """Batch tensors: stretched tokens, prompt-mel condition, keep mask, speaker; and frame counts."""
        device = next(self.parameters()).device
        sequences = [torch.cat([it.prompt_tokens, it.tokens]).long() for it in items]
        frames = [self.frames_for(len(t)) for t in sequences]
        width = max(frames)
        tokens = torch.zeros(len(items), width, dtype=torch.long, device=device)
        mel_cond = torch.zeros(len(items), width, self.cfg.mel_dim, device=device)
        keep = torch.zeros(len(items), width, dtype=torch.bool, device=device)
        for i, (it, seq, n) in enumerate(zip(items, sequences, frames)):
            tokens[i, :n] = F.interpolate(seq[None, None].float(), size=n, mode="nearest")[0, 0].long()
            p = min(len(it.prompt_mel), n)
            mel_cond[i, :p] = it.prompt_mel[len(it.prompt_mel) - p:].to(device)
            keep[i, :n] = True
        speaker = F.normalize(torch.stack([it.speaker.float() for it in items]).to(device), dim=1)
        return tokens, mel_cond, keep, speaker, frames, [len(it.prompt_mel) for it in items]

    @torch.inference_mode()
    def generate(self, items: Sequence[FlowInput], steps: int = 10,
                 noise: Sequence[torch.Tensor] | None = None) -> list[torch.Tensor]:
        """Mel ``[mel, frames]`` of each utterance's new tokens (the prompt's frames are dropped). ``noise``: the
        starting point per utterance, ``[frames, mel]`` (default: standard normal)."""
        mels, _ = self._sample(items, steps, noise)
        return mels

    @torch.inference_mode()
    def generate_streaming(self, item: FlowInput, steps: int, block_pattern: Sequence[int],
                           cache: StreamingCache | None = None) -> tuple[torch.Tensor, StreamingCache]:
        """One pass of the release's streaming (``inference_with_cache``): the mel of all tokens so far under
        block-causal attention (:func:`vocalign.policies.streaming.block_causal_mask` of ``block_pattern``, token
        blocks, the prompt's first, sized in frames as released), each Euler step starting from the previous pass's state on its first
        ``cache.settled_frames`` frames. Returns the mel and this pass's states, whose ``settled_frames`` the
        caller sets before the next pass."""
        from .streaming import block_causal_mask, mask_frames

        frames = self.frames_for(len(item.prompt_tokens) + len(item.tokens))
        device = next(self.parameters()).device
        block_mask = block_causal_mask([mask_frames(n) for n in block_pattern], frames).to(device)
        mels, states = self._sample([item], steps, block_mask=block_mask, cache=cache)
        return mels[0], StreamingCache(states)

    def _sample(self, items: Sequence[FlowInput], steps: int, noise: Sequence[torch.Tensor] | None = None,
                block_mask: torch.Tensor | None = None, cache: StreamingCache | None = None
                ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Euler integration; returns the mels and the state entering each step (after the cache's overwrite)."""
        tokens, mel_cond, keep, speaker, frames, prompt_frames = self._conditions(items)
        cond = mel_cond
        if not self.cfg.remove_spkr_concat_condition:
            spk = self.spk_embed_affine_layer(speaker).unsqueeze(1).expand(-1, mel_cond.shape[1], -1)
            cond = torch.cat([mel_cond, spk], dim=-1)
        ada_spk = speaker if self.cfg.spkr_emb_adaLN else None
        x = torch.randn_like(mel_cond)
        for i, start in enumerate(noise or []):
            x[i, : frames[i]] = start[: frames[i]].to(x)
        schedule = torch.linspace(0, 1, steps + 1, device=x.device)
        if self.cfg.t_scheduler == "cosine":
            schedule = 1 - torch.cos(schedule * 0.5 * math.pi)
        w = self.cfg.inference_cfg_rate
        uncond_tokens = torch.zeros_like(tokens) if self.cfg.speech_token_cfg else tokens
        states = []
        for step, (t0, t1) in enumerate(zip(schedule[:-1], schedule[1:])):
            if cache is not None:
                reused = min(x.shape[1], cache.settled_frames)
                x[:, :reused] = cache.states[step][:, :reused]
            states.append(x.clone())
            t = t0.expand(x.shape[0])
            if w > 0:  # conditional and unconditional velocities in one batched forward
                v_both = self.estimator(
                    torch.cat([x, x]), torch.cat([cond, torch.zeros_like(cond)]),
                    torch.cat([tokens, uncond_tokens]), torch.cat([t, t]), torch.cat([keep, keep]),
                    None if ada_spk is None else torch.cat([ada_spk, torch.zeros_like(ada_spk)]), block_mask)
                v_cond, v_uncond = v_both.chunk(2)
                v = (1 + w) * v_cond - w * v_uncond
            else:
                v = self.estimator(x, cond, tokens, t, keep, ada_spk, block_mask)
            x = x + (t1 - t0) * v
        return [x[i, p:n].T.contiguous() for i, (p, n) in enumerate(zip(prompt_frames, frames))], states


@dataclass
class StreamingCache:
    """What a streaming pass hands the next: the ODE state entering each Euler step (``[1, frames, mel]``), and how
    many leading frames of it the next pass reuses (set by the caller, 0 until then)."""

    states: list[torch.Tensor]
    settled_frames: int = 0
