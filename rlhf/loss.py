"""The clipped surrogate objective and its aggregation over tokens.

The loss is split so that gradient accumulation is exact: :func:`aggregate` divides by the size of the *whole*
batch (tokens or sequences), given by the caller, so summing micro-batch losses gives the full-batch loss whatever
the micro-batch size. With ``num_tokens=mask.sum()`` and ``num_sequences=len(mask)`` it is the one-batch loss of
TRL's GRPOTrainer (``dapo``, ``grpo``, ``dr_grpo``), which the tests check.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from trl.trainer.utils import selective_log_softmax

from ..common.generation import left_padded_positions

LossType = Literal["token_mean", "seq_mean", "dr_grpo"]
# TRL's names for the same aggregations, accepted so that TRL configs carry over.
LOSS_TYPE_ALIASES = {"dapo": "token_mean", "grpo": "seq_mean", "token_mean": "token_mean",
                     "seq_mean": "seq_mean", "dr_grpo": "dr_grpo"}


def canonical_loss_type(loss_type: str) -> LossType:
    try:
        return LOSS_TYPE_ALIASES[loss_type]  # type: ignore[return-value]
    except KeyError:
        raise ValueError(f"loss_type must be one of {sorted(LOSS_TYPE_ALIASES)}, got {loss_type!r}") from None


def completion_logps(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    logits_to_keep: int,
    temperature: float,
) -> torch.Tensor:
    """Log-probs ``[B, logits_to_keep]`` of the last ``logits_to_keep`` tokens under ``softmax(logits / T)``.

    Scaling by the sampling temperature makes these the probabilities the tokens were drawn with (before top-k/top-p
    truncation, as in TRL), so the ratio to the sampler's log-probs starts at exactly 1. Only the completion's logits
    are materialised: with the real 98304-token vocabulary the full ``[B, L, V]`` tensor would dominate memory.
    """
    logits = model(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=left_padded_positions(attention_mask),
        logits_to_keep=logits_to_keep + 1, use_cache=False,
    ).logits
    logits = logits[:, :-1, :]  # position t predicts token t + 1
    return selective_log_softmax(logits, input_ids[:, -logits_to_keep:], temperature=temperature)


@dataclass
class SurrogateTerms:
    per_token_loss: torch.Tensor  # [B, T], not yet masked
    clipped_low: torch.Tensor  # [B, T] bool: ratio below 1 - eps_low with A < 0 (gradient cut)
    clipped_high: torch.Tensor  # [B, T] bool: ratio above 1 + eps_high with A > 0
    kl: torch.Tensor | None  # [B, T] k3 estimate, None when beta == 0
    log_ratio: torch.Tensor  # [B, T] log(pi / pi_old), detached: how far the update has moved from the sampler


def clipped_surrogate(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    advantages: torch.Tensor,
    *,
    epsilon_low: float,
    epsilon_high: float,
    ref_logps: torch.Tensor | None = None,
    beta: float = 0.0,
) -> SurrogateTerms:
    """Per-token ``-min(r A, clip(r, 1 - eps_low, 1 + eps_high) A) + beta * k3``, with ``r = exp(logp - logp_old)``.

    eps_high > eps_low ("clip-higher", DAPO) lets low-probability tokens with positive advantage grow faster than
    they may shrink, which keeps exploration alive. k3 = exp(ref - logp) - (ref - logp) - 1 is an unbiased,
    always-positive estimate of KL(pi || ref).
    """
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(1)
    ratio = torch.exp(logps - old_logps)
    clipped_ratio = torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high)
    per_token_loss = -torch.min(ratio * advantages, clipped_ratio * advantages)
    kl = None
    if beta != 0.0:
        if ref_logps is None:
            raise ValueError("beta > 0 needs the reference model's log-probs (ref_logps)")
        delta = ref_logps - logps
        kl = torch.exp(delta) - delta - 1
        per_token_loss = per_token_loss + beta * kl
    with torch.no_grad():
        clipped_low = (ratio < 1 - epsilon_low) & (advantages < 0)
        clipped_high = (ratio > 1 + epsilon_high) & (advantages > 0)
    return SurrogateTerms(per_token_loss, clipped_low, clipped_high, kl, (logps - old_logps).detach())


def aggregate(
    per_token_loss: torch.Tensor,
    mask: torch.Tensor,
    loss_type: str,
    *,
    num_tokens: float,
    num_sequences: float,
    max_completion_length: int | None = None,
) -> torch.Tensor:
    """Reduce ``[B, T]`` to a scalar whose sum over micro-batches is the loss of the whole batch.

    token_mean (DAPO): every token of the batch weighs the same, so long utterances are not under-weighted.
    seq_mean (GRPO): mean over tokens within a sequence, then over sequences.
    dr_grpo: sum over tokens / (num_sequences * max_completion_length), a constant, so no length bias either way.
    """
    mask = mask.to(per_token_loss.dtype)
    masked = per_token_loss * mask
    loss_type = canonical_loss_type(loss_type)
    if loss_type == "token_mean":
        return masked.sum() / max(float(num_tokens), 1.0)
    if loss_type == "seq_mean":
        return (masked.sum(-1) / mask.sum(-1).clamp(min=1.0)).sum() / max(float(num_sequences), 1.0)
    if max_completion_length is None:
        raise ValueError("loss_type 'dr_grpo' needs max_completion_length")
    return masked.sum() / (float(num_sequences) * max_completion_length)
