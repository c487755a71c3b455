"""Streaming token-to-audio as GLM-TTS releases it (``Token2Wav.token2wav_stream``): schedule, mask and stitching.

Speech tokens arrive in blocks (25, 50, 200, then 200 tokens). After each block the flow decodes every token so far
with block-causal attention, reusing from the previous pass the ODE states of the frames that pass had settled (all
but those of its look-ahead tokens: 12, 25, then 100), and the vocoder renders the whole mel again. The audio before
the look-ahead and a 0.1 s fade is final and emitted; that 0.1 s is cross-faded with the next pass's rendering of
the same span.

Three quirks of the release are reproduced, since they shape its audio: attention blocks are sized in frames of an
86 Hz mel (tokens / 12.5 * 22050 / 256, from an earlier model) although the mel runs at 50 Hz; the prompt's block is
one token wide whatever the prompt's length (the release passes ``len()`` of its ``[1, P]`` prompt-token tensor);
and the reused span counts the frames of the settled audio from the start of the sequence plus two, not past the
prompt's frames (it adds ``shape[0]`` of the ``[1, T, 80]`` prompt mel, i.e. 1, where the prompt's length was meant).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

RELEASED_BLOCKS = (25, 50, 200)
RELEASED_LOOKAHEAD = (12, 25, 100)
RELEASED_FADE_S = 0.1
PROMPT_BLOCK_TOKENS = 1  # the released prompt block, see above


def block_ends(num_tokens: int, blocks: Sequence[int]) -> list[int]:
    """End index of each block of ``num_tokens`` tokens, block sizes ``blocks`` with the last one repeating."""
    if not blocks or min(blocks) < 1:
        raise ValueError(f"block sizes must be positive token counts, got {list(blocks)}")
    ends, k = [], 0
    while not ends or ends[-1] < num_tokens:
        ends.append(min((ends[-1] if ends else 0) + blocks[min(k, len(blocks) - 1)], num_tokens))
        k += 1
    return ends if num_tokens else []


def mask_frames(num_tokens: int) -> int:
    """Attention-block width for ``num_tokens`` tokens, as the release's DiT computes it (86 Hz mel frames)."""
    return int(num_tokens / 12.5 * 22050 / 256)


def block_causal_mask(block_frames: Sequence[int], length: int) -> torch.Tensor:
    """``[length, length]`` bool, True where a frame may attend: the release's block mask for blocks of
    ``block_frames`` frames (the last size repeats; :func:`mask_frames` converts token blocks). A frame sees every
    earlier block, its own block and, near its block's end, a little of the next: at least half its block (two
    thirds past 172 frames) ahead of it."""
    sizes = list(block_frames)
    if not sizes or sizes[-1] < 1:
        raise ValueError(f"the last block must be at least one frame wide, got {sizes}")
    reach = torch.zeros(length, dtype=torch.long)
    start, k = 0, 0
    while start < length:
        size = sizes[min(k, len(sizes) - 1)]
        rows = torch.arange(start, min(start + size, length))
        ahead = size - 1 - (rows - start)
        min_ahead = int(size / 2) if size <= 172 else int(size / 1.5)
        reach[rows] = start + size + (min_ahead - ahead).clamp(min=0)
        start, k = start + size, k + 1
    return torch.arange(length)[None, :] < reach[:, None]


def settled_frames(audio_samples: int, lookahead_tokens: int, token_rate: float, sample_rate: int, hop: int) -> int:
    """Leading frames (counted from the prompt's first) whose ODE states the next pass reuses, as released: the
    frames of the audio before the look-ahead, plus two."""
    settled_s = audio_samples / sample_rate - lookahead_tokens / token_rate
    return 1 + int(settled_s * sample_rate / hop) + 1


class Stitcher:
    """Joins the passes' renderings: emits what is final, holds back the look-ahead and a fade, and cross-fades the
    held fade linearly into the next rendering of the same span."""

    def __init__(self, sample_rate: int, fade_s: float = RELEASED_FADE_S) -> None:
        self.sample_rate, self.fade_s = sample_rate, fade_s
        self.emitted = 0
        self.fade_out: np.ndarray | None = None

    def add(self, audio: np.ndarray, lookahead_s: float, last: bool) -> np.ndarray:
        """The new final audio from a pass's rendering ``audio`` of everything so far."""
        new = np.array(audio[self.emitted:], dtype=np.float32)
        if self.fade_out is not None:
            n = min(len(self.fade_out), len(new))
            new[:n] = self.fade_out[:n] * np.linspace(1, 0, n) + new[:n] * np.linspace(0, 1, n)
        if last:
            return new
        overlap = int(self.sample_rate * (lookahead_s + self.fade_s))
        held_ahead = int(self.sample_rate * lookahead_s)
        final = new[:max(0, len(new) - overlap)]
        self.emitted += len(final)
        self.fade_out = new[-overlap:-held_ahead] if held_ahead > 0 else new[-overlap:]
        return final
