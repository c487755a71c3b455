"""Seconds of audio -> speech-token positions: which tokens of a completion made the stretch a reward's span covers.

A speech LM's token k is decoded into the audio slot ``[delay_s + k / token_rate_hz, delay_s + (k + 1) /
token_rate_hz)``: 25 Hz for GLM-TTS (its Whisper-VQ tokens, stretched two mel frames each by the flow) and for the
demo's mel units (two 50 Hz frames per code). Neither codec shifts its audio against its tokens (the flow is not
causal and drops the prompt's frames; HiFT and Griffin-Lim are centred), so both environments record ``delay_s`` 0;
the residue (the flow's prompt-frame rounding, Griffin-Lim's half-frame centring) is at most 20 ms, half a slot.
Completion token k is code k (``SpeechLM.codes``): the stop token, last, made no audio and no span reaches it; a
drawn non-speech token (possible only without ``speech_only``) has no code and shifts the tokens after it by one.

A token gets the sum of the values of the spans that overlap its slot (a token straddling a wrong word and the next
gets the wrong word's value) and is *touched* when any span overlaps it; a token no span overlaps gets 0, untouched,
so the trainer can tell "checked and fine" (a value-0 span) from "not checked".
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from ..rewards.base import Span
from .rollout import Rollouts

BOUNDARY_S = 1e-6  # a span that ends exactly where a slot starts does not overlap it, float noise notwithstanding


def token_values(spans: Sequence[Span], num_tokens: int, token_rate_hz: float, delay_s: float = 0.0
                 ) -> tuple[np.ndarray, np.ndarray]:
    """``(values [num_tokens] float32, touched [num_tokens] bool)`` of one completion's tokens."""
    if not token_rate_hz > 0:
        raise ValueError(f"token_rate_hz must be > 0 (tokens per second of audio), got {token_rate_hz!r}")
    if num_tokens < 0:
        raise ValueError(f"num_tokens must be >= 0, got {num_tokens}")
    slot_start = delay_s + np.arange(num_tokens) / token_rate_hz
    slot_end = slot_start + 1.0 / token_rate_hz
    values = np.zeros(num_tokens, np.float64)
    touched = np.zeros(num_tokens, bool)
    for start, end, value in spans:
        overlaps = (slot_start < end - BOUNDARY_S) & (slot_end > start + BOUNDARY_S)
        values[overlaps] += value
        touched |= overlaps
    return values.astype(np.float32), touched


def token_value_grid(spans: Sequence[Sequence[Span]], num_tokens: Sequence[int], width: int, token_rate_hz: float,
                     delay_s: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """``(values [N, width], touched [N, width])`` for N completions of ``num_tokens[i]`` tokens each, padded with
    0 / False to ``width`` (the completion mask's), rows aligned with the completions."""
    if len(spans) != len(num_tokens):
        raise ValueError(f"{len(spans)} span lists for {len(num_tokens)} completions")
    if any(n > width for n in num_tokens):
        raise ValueError(f"a completion of {max(num_tokens)} tokens does not fit width {width}")
    values = np.zeros((len(spans), width), np.float32)
    touched = np.zeros((len(spans), width), bool)
    for row, (row_spans, n) in enumerate(zip(spans, num_tokens)):
        values[row, :n], touched[row, :n] = token_values(row_spans, n, token_rate_hz, delay_s)
    return values, touched


def rollout_token_values(rollouts: Rollouts, spans: Sequence[Sequence[Span]], token_rate_hz: float,
                         delay_s: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`token_value_grid` for a batch of rollouts: ``(values, touched)`` ``[N, C]``, aligned with its
    ``completion_mask`` (what an environment's ``localise`` returns)."""
    values, touched = token_value_grid(spans, rollouts.completion_mask.sum(-1).tolist(),
                                       rollouts.completion_ids.shape[1], token_rate_hz, delay_s)
    return torch.from_numpy(values), torch.from_numpy(touched)
