"""The seed-tts-eval speaker model: ECAPA-TDNN over a learned mix of WavLM-large layers.

seed-tts-eval (and the GLM-TTS report's SIM numbers) use UniSpeech's ``wavlm_large_finetune.pth``: a dict whose
``"model"`` entry holds ``feature_weight`` (one logit per WavLM hidden state), the WavLM upstream under
``feature_extract.model.`` in fairseq naming, and the ECAPA-TDNN head (``layer1`` .. ``layer4``, ``conv``,
``pooling``, ``bn``, ``linear``). Here WavLM is transformers' ``WavLMModel``; :func:`convert_upstream_key` maps the
fairseq names onto it, and the head is written out with the checkpoint's own module names so its keys load as they
are. Output: a 256-d embedding per utterance at 16 kHz.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..common.weights import load_strict, read_state_dict

UPSTREAM_PREFIX = "feature_extract.model."
# Pre-training leftovers present in some checkpoints; the verifier never uses them.
_UNUSED_UPSTREAM = ("label_embs_concat", "final_proj.", "quantizer.", "project_q.")

_RULES: list[tuple[re.Pattern[str], str]] = [(re.compile(p), r) for p, r in [
    (r"^feature_extractor\.conv_layers\.(\d+)\.0\.weight$", r"feature_extractor.conv_layers.\1.conv.weight"),
    (r"^feature_extractor\.conv_layers\.(\d+)\.2\.1\.(weight|bias)$", r"feature_extractor.conv_layers.\1.layer_norm.\2"),
    (r"^feature_extractor\.conv_layers\.0\.2\.(weight|bias)$", r"feature_extractor.conv_layers.0.layer_norm.\1"),
    (r"^layer_norm\.(weight|bias)$", r"feature_projection.layer_norm.\1"),
    (r"^post_extract_proj\.(weight|bias)$", r"feature_projection.projection.\1"),
    (r"^mask_emb$", "masked_spec_embed"),
    (r"^encoder\.pos_conv\.0\.bias$", "encoder.pos_conv_embed.conv.bias"),
    (r"^encoder\.pos_conv\.0\.weight_g$", "encoder.pos_conv_embed.conv.parametrizations.weight.original0"),
    (r"^encoder\.pos_conv\.0\.weight_v$", "encoder.pos_conv_embed.conv.parametrizations.weight.original1"),
    (r"^encoder\.layer_norm\.(weight|bias)$", r"encoder.layer_norm.\1"),
    (r"^encoder\.layers\.(\d+)\.self_attn\.(q|k|v|out)_proj\.(weight|bias)$", r"encoder.layers.\1.attention.\2_proj.\3"),
    (r"^encoder\.layers\.(\d+)\.self_attn\.relative_attention_bias\.weight$",
     r"encoder.layers.\1.attention.rel_attn_embed.weight"),
    (r"^encoder\.layers\.(\d+)\.self_attn\.grep_linear\.(weight|bias)$",
     r"encoder.layers.\1.attention.gru_rel_pos_linear.\2"),
    (r"^encoder\.layers\.(\d+)\.self_attn\.grep_a$", r"encoder.layers.\1.attention.gru_rel_pos_const"),
    (r"^encoder\.layers\.(\d+)\.self_attn_layer_norm\.(weight|bias)$", r"encoder.layers.\1.layer_norm.\2"),
    (r"^encoder\.layers\.(\d+)\.fc1\.(weight|bias)$", r"encoder.layers.\1.feed_forward.intermediate_dense.\2"),
    (r"^encoder\.layers\.(\d+)\.fc2\.(weight|bias)$", r"encoder.layers.\1.feed_forward.output_dense.\2"),
    (r"^encoder\.layers\.(\d+)\.final_layer_norm\.(weight|bias)$", r"encoder.layers.\1.final_layer_norm.\2"),
]]


def convert_upstream_key(key: str) -> str | None:
    """fairseq/UniSpeech WavLM name -> transformers ``WavLMModel`` name; None for unused pre-training parts."""
    if key.startswith(_UNUSED_UPSTREAM):
        return None
    for pattern, replacement in _RULES:
        if pattern.match(key):
            return pattern.sub(replacement, key)
    raise KeyError(f"unknown WavLM upstream key {key!r}")


class ConvReluBn(nn.Module):
    def __init__(self, cin: int, cout: int, kernel: int = 1, padding: int = 0, dilation: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv1d(cin, cout, kernel, padding=padding, dilation=dilation)
        self.bn = nn.BatchNorm1d(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(F.relu(self.conv(x)))


class Res2ConvReluBn(nn.Module):
    """Multi-scale residual convolution: channels split in ``scale`` groups, each fed the previous group's output."""

    def __init__(self, channels: int, kernel: int, padding: int, dilation: int, scale: int) -> None:
        super().__init__()
        self.width = channels // scale
        self.convs = nn.ModuleList(nn.Conv1d(self.width, self.width, kernel, padding=padding, dilation=dilation)
                                   for _ in range(scale - 1))
        self.bns = nn.ModuleList(nn.BatchNorm1d(self.width) for _ in range(scale - 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        parts = torch.split(x, self.width, 1)
        out, running = [], None
        for i, (conv, bn) in enumerate(zip(self.convs, self.bns)):
            running = parts[i] if running is None else running + parts[i]
            running = bn(F.relu(conv(running)))
            out.append(running)
        out.append(parts[-1])
        return torch.cat(out, dim=1)


class SqueezeExcite(nn.Module):
    def __init__(self, channels: int, bottleneck: int = 128) -> None:
        super().__init__()
        self.linear1 = nn.Linear(channels, bottleneck)
        self.linear2 = nn.Linear(bottleneck, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = torch.sigmoid(self.linear2(F.relu(self.linear1(x.mean(dim=2)))))
        return x * gate.unsqueeze(2)


class SERes2Block(nn.Module):
    def __init__(self, channels: int, dilation: int, scale: int = 8, bottleneck: int = 128) -> None:
        super().__init__()
        # attribute names follow the checkpoint's keys
        self.Conv1dReluBn1 = ConvReluBn(channels, channels)
        self.Res2Conv1dReluBn = Res2ConvReluBn(channels, 3, dilation, dilation, scale)
        self.Conv1dReluBn2 = ConvReluBn(channels, channels)
        self.SE_Connect = SqueezeExcite(channels, bottleneck)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.SE_Connect(self.Conv1dReluBn2(self.Res2Conv1dReluBn(self.Conv1dReluBn1(x))))


class AttentiveStatsPool(nn.Module):
    def __init__(self, dim: int, attention: int = 128) -> None:
        super().__init__()
        self.linear1 = nn.Conv1d(dim, attention, kernel_size=1)
        self.linear2 = nn.Conv1d(attention, dim, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        alpha = torch.softmax(self.linear2(torch.tanh(self.linear1(x))), dim=2)
        mean = (alpha * x).sum(dim=2)
        std = ((alpha * x * x).sum(dim=2) - mean * mean).clamp(min=1e-9).sqrt()
        return torch.cat([mean, std], dim=1)


class EcapaWavLM(nn.Module):
    """WavLM (transformers) -> softmax-weighted sum of its hidden states -> ECAPA-TDNN -> embedding."""

    def __init__(self, wavlm: nn.Module, channels: int = 512, emb_dim: int = 256, pooled: int = 1536) -> None:
        super().__init__()
        self.wavlm = wavlm.eval().requires_grad_(False)
        feat_dim = wavlm.config.hidden_size
        self.feature_weight = nn.Parameter(torch.zeros(wavlm.config.num_hidden_layers + 1))
        self.instance_norm = nn.InstanceNorm1d(feat_dim)
        self.layer1 = ConvReluBn(feat_dim, channels, kernel=5, padding=2)
        self.layer2 = SERes2Block(channels, dilation=2)
        self.layer3 = SERes2Block(channels, dilation=3)
        self.layer4 = SERes2Block(channels, dilation=4)
        self.conv = nn.Conv1d(channels * 3, pooled, kernel_size=1)
        self.pooling = AttentiveStatsPool(pooled)
        self.bn = nn.BatchNorm1d(pooled * 2)
        self.linear = nn.Linear(pooled * 2, emb_dim)

    def features(self, wav: torch.Tensor) -> torch.Tensor:
        wav = F.layer_norm(wav, wav.shape[-1:])  # WavLM-large normalises each waveform
        hidden = torch.stack(self.wavlm(wav, output_hidden_states=True).hidden_states, dim=0)
        weights = torch.softmax(self.feature_weight, dim=-1).view(-1, 1, 1, 1)
        return self.instance_norm((weights * hidden).sum(dim=0).transpose(1, 2) + 1e-6)

    def forward(self, wav: torch.Tensor) -> torch.Tensor:
        x = self.features(wav)
        out2 = self.layer2(self.layer1(x))
        out3 = self.layer3(out2)
        out4 = self.layer4(out3)
        out = F.relu(self.conv(torch.cat([out2, out3, out4], dim=1)))
        return self.linear(self.bn(self.pooling(out)))

    def load_published(self, checkpoint: str | Path) -> None:
        """Load ``wavlm_large_finetune.pth``; a missing, unknown or misshapen key names the file and the key."""
        state = read_state_dict(checkpoint)
        converted: dict[str, torch.Tensor] = {}
        for key, value in state.items():
            if key.startswith(UPSTREAM_PREFIX):
                try:
                    name = convert_upstream_key(key.removeprefix(UPSTREAM_PREFIX))
                except KeyError as err:
                    raise ValueError(f"{checkpoint}: {err.args[0]}") from None
                if name is not None:
                    converted["wavlm." + name] = value
            else:
                converted[key] = value
        load_strict(self, converted, checkpoint)


def wavlm_large_config():
    """WavLM-large as UniSpeech trained it (24 layers, 1024 wide, layer-norm feature extractor)."""
    from transformers import WavLMConfig

    return WavLMConfig(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
                       feat_extract_norm="layer", do_stable_layer_norm=True, conv_bias=False)


class EcapaWavLMEncoder:
    """SIM backend ``kind: ecapa_wavlm``: the seed-tts-eval verifier from ``wavlm_large_finetune.pth``."""

    def __init__(self, checkpoint: str | Path | None = None, device: str = "cpu", *,
                 model: EcapaWavLM | None = None) -> None:
        if model is None:
            if checkpoint is None:
                raise ValueError("ecapa_wavlm needs `checkpoint: PATH/wavlm_large_finetune.pth`")
            from transformers import WavLMModel

            model = EcapaWavLM(WavLMModel(wavlm_large_config()))
            model.load_published(checkpoint)
        self.model, self.device = model.to(device).eval(), device

    @torch.no_grad()
    def embed(self, audios: Sequence[np.ndarray]) -> np.ndarray:
        # one at a time: utterance-level layer norm and attentive pooling must not see padding
        return np.stack([self.model(torch.from_numpy(a).to(self.device).unsqueeze(0))[0].cpu().numpy()
                         for a in audios])
