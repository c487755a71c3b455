"""Group-relative advantages for several rewards at once.

GLM-TTS fuses rewards of very different scales (a CER reward in [0, 1] that moves a lot, a speaker-similarity reward
that barely moves). Summing raw rewards lets the widest one dominate, so the report normalises each reward inside its
group first, fuses the z-scores with the configured weights, and normalises the fused value again ("hierarchical").
TRL's default ("sum_then_normalize") is kept for ablations.

All functions take rewards shaped ``[num_prompts, num_generations, num_rewards]`` and return advantages shaped
``[num_prompts, num_generations]``. Standard deviations are unbiased (``correction=1``) as in TRL, so that our
numbers match TRL's on the same rewards.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal

import torch

Normalization = Literal["hierarchical", "sum_then_normalize"]
ScaleRewards = Literal["group", "batch", "none"]


def rewards_to_tensor(
    rewards: Mapping[str, Sequence[float | None]], names: Sequence[str], num_generations: int
) -> torch.Tensor:
    """Stack per-reward lists into ``[num_prompts, num_generations, K]``, rejecting missing or non-finite values.

    A reward that is ``None`` or NaN usually means a reward model failed; scoring it as 0 would silently teach the
    policy, so we refuse and name the reward and the samples instead.
    """
    columns = []
    for name in names:
        if name not in rewards:
            raise ValueError(f"reward {name!r} is missing from the scores (got {sorted(rewards)}); "
                             "check that every configured reward plugin returned a value")
        values = list(rewards[name])
        bad = [i for i, v in enumerate(values) if v is None or not torch.isfinite(torch.tensor(float(v)))]
        if bad:
            raise ValueError(f"reward {name!r} has missing or non-finite values at samples {bad[:10]}"
                             f"{' ...' if len(bad) > 10 else ''}; fix the reward plugin or drop those prompts")
        columns.append(torch.tensor([float(v) for v in values], dtype=torch.float64))
    lengths = {len(c) for c in columns}
    if len(lengths) != 1:
        raise ValueError(f"rewards have different lengths: {dict(zip(names, map(len, columns)))}")
    (n,) = lengths
    if n % num_generations:
        raise ValueError(f"{n} rewards cannot be split into groups of num_generations={num_generations}")
    return torch.stack(columns, dim=-1).view(n // num_generations, num_generations, len(names))


def group_std(x: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """Unbiased std along ``dim``; a single sample has no spread, so it is 0 instead of NaN."""
    if x.shape[dim] < 2:
        return torch.zeros_like(x.select(dim, 0)).unsqueeze(dim)
    return x.std(dim=dim, keepdim=True)


def flat_reward_mask(rewards: torch.Tensor, std_tolerance: float) -> torch.Tensor:
    """``[P, K]`` bool: reward k is flat (carries no ranking) within prompt p's group."""
    return group_std(rewards, dim=1).squeeze(1) <= std_tolerance


def _standardise(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, scale: bool, eps: float,
                 std_tolerance: float) -> torch.Tensor:
    """(x - mean) / (std + eps); where std is within tolerance of 0 there is nothing to rank, so 0."""
    centred = x - mean
    if not scale:
        return centred
    return torch.where(std <= std_tolerance, torch.zeros_like(centred), centred / (std + eps))


def normalize_per_reward(
    rewards: torch.Tensor, *, scale: bool = True, std_tolerance: float = 1e-6, eps: float = 1e-4
) -> torch.Tensor:
    """Step 1 of the hierarchy: each reward z-scored within its group; a reward flat in a group gives 0 there."""
    std_k = group_std(rewards, dim=1)
    z = _standardise(rewards, rewards.mean(dim=1, keepdim=True), std_k, scale, eps, std_tolerance)
    return z.masked_fill(std_k <= std_tolerance, 0.0)


def compute_advantages(
    rewards: torch.Tensor,
    weights: torch.Tensor | Sequence[float],
    *,
    normalization: Normalization = "hierarchical",
    scale_rewards: ScaleRewards = "group",
    std_tolerance: float = 1e-6,
    eps: float = 1e-4,
) -> torch.Tensor:
    """Advantages ``[P, G]`` from rewards ``[P, G, K]``.

    hierarchical:
        1. z[p,g,k] = (r - mean_g r) / (std_g r + eps); a reward flat in its group (std <= tolerance) gives 0.
        2. f[p,g] = sum_k w_k z[p,g,k].
        3. A = (f - mean f) / (std f + eps), mean and std over the group (``scale_rewards="group"``) or the whole
           batch (``"batch"``, equal to TRL's ``normalize_then_sum``). ``"none"`` skips every std division.
    sum_then_normalize (TRL's default):
        f = sum_k w_k r_k;  A = (f - mean_group f) / (std f + eps), std over the group or the batch.
    """
    if rewards.dim() != 3:
        raise ValueError(f"rewards must be [num_prompts, num_generations, num_rewards], got {tuple(rewards.shape)}")
    if not torch.isfinite(rewards).all():
        raise ValueError("rewards contain NaN or inf; validate them with rewards_to_tensor first")
    weights = torch.as_tensor(weights, dtype=rewards.dtype, device=rewards.device)
    if weights.shape != (rewards.shape[-1],):
        raise ValueError(f"got {weights.numel()} reward weights for {rewards.shape[-1]} rewards")
    if scale_rewards not in ("group", "batch", "none"):
        raise ValueError(f"scale_rewards must be 'group', 'batch' or 'none', got {scale_rewards!r}")
    scale = scale_rewards != "none"

    if normalization == "hierarchical":
        z = normalize_per_reward(rewards, scale=scale, std_tolerance=std_tolerance, eps=eps)
        fused = (z * weights).sum(dim=-1)
    elif normalization == "sum_then_normalize":
        fused = (rewards * weights).sum(dim=-1)
    else:
        raise ValueError(f"normalization must be 'hierarchical' or 'sum_then_normalize', got {normalization!r}")

    group_mean = fused.mean(dim=1, keepdim=True)
    if scale_rewards == "batch":
        std = fused.std() if fused.numel() > 1 else torch.zeros((), dtype=fused.dtype)
        # Hierarchical fused values already have zero group means, so centring on the batch mean is the same thing
        # and matches TRL's normalize_then_sum bit for bit.
        mean = fused.mean() if normalization == "hierarchical" else group_mean
    else:
        std = group_std(fused, dim=1)
        mean = group_mean
    return _standardise(fused, mean, std, scale, eps, std_tolerance)
