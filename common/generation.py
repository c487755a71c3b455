"""What a sampler and the trainer agree on: how tokens are drawn, and where left-padded rows' positions start.

The trainer's core asks an environment for completions with :class:`SamplingParams` and scores them again with
:func:`left_padded_positions`; the speech LM's sampler uses both too. Living here, below both, the trainer knows
nothing of ``policies``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingParams:
    """How a caller wants tokens drawn, as one value from the trainer's config, the evaluation's or the CLI's down
    to the sampler. The defaults truncate nothing; :data:`RELEASED_SAMPLING` holds GLM-TTS's inference settings."""

    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    max_new_tokens: int | None = None  # None: the caller's own bound (the speech LM's is twice the text's tokens)
    min_new_tokens: int = 0
    # keep calling the model until every process is done: under DeepSpeed ZeRO-3 with several processes each
    # forward pass is a collective
    synced_processes: bool = False


def left_padded_positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids of left-padded rows: 0 at each row's first real token (padding gets 0 too). The sampler and the
    trainer's log-prob pass must agree on them, or the PPO ratio would not start at 1."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)
