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

import math
from collections.abc import Mapping, Sequence
from typing import Literal

import torch

Normalization = Literal["hierarchical", "sum_then_normalize"]
ScaleRewards = Literal["group", "batch", "none"]


def rewards_to_tensor(
    rewards: Mapping[str, Sequence[float | None]], names: Sequence[str], num_generations: int
) -> torch.Tensor:
    """Stack per-reward lists into ``[num_prompts, num_generations, K]``; a missing value (None) becomes NaN.

    NaN marks a sample that a reward could not score (see ``Scores``): the trainer masks it out of advantages and
    loss rather than scoring it 0, which would silently teach the policy. Infinite values are refused, naming the
    reward and the samples: no reward means them."""
    columns = []
    for name in names:
        if name not in rewards:
            raise ValueError(f"reward {name!r} is missing from the scores (got {sorted(rewards)}); "
                             "check that every configured reward plugin returned a value")
        column = torch.tensor([math.nan if v is None else float(v) for v in rewards[name]], dtype=torch.float64)
        bad = torch.isinf(column).nonzero().flatten().tolist()
        if bad:
            raise ValueError(f"reward {name!r} has infinite values at samples {bad[:10]}"
                             f"{' ...' if len(bad) > 10 else ''}; fix the reward plugin")
        columns.append(column)
    lengths = {len(c) for c in columns}
    if len(lengths) != 1:
        raise ValueError(f"rewards have different lengths: {dict(zip(names, map(len, columns)))}")
    (n,) = lengths
    if n % num_generations:
        raise ValueError(f"{n} rewards cannot be split into groups of num_generations={num_generations}")
    return torch.stack(columns, dim=-1).view(n // num_generations, num_generations, len(names))


def scored_samples(rewards: torch.Tensor) -> torch.Tensor:
    """``[P, G]`` bool: samples every reward scored (no NaN); the others are masked."""
    return ~torch.isnan(rewards).any(-1)


def group_std(x: torch.Tensor, dim: int = 1, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Unbiased std along ``dim`` over the ``valid`` entries (all by default); fewer than two have no spread, so 0
    instead of NaN."""
    if valid is None:
        if x.shape[dim] < 2:
            return torch.zeros_like(x.select(dim, 0)).unsqueeze(dim)
        return x.std(dim=dim, keepdim=True)
    count = valid.sum(dim, keepdim=True)
    mean = group_mean(x, dim, valid)
    squares = torch.where(valid, (x - mean) ** 2, torch.zeros_like(x)).sum(dim, keepdim=True)
    return torch.where(count > 1, (squares / (count - 1).clamp(min=1)).sqrt(), torch.zeros_like(squares))


def group_mean(x: torch.Tensor, dim: int = 1, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Mean along ``dim`` over the ``valid`` entries (all by default); 0 where none is valid."""
    if valid is None:
        return x.mean(dim=dim, keepdim=True)
    total = torch.where(valid, x, torch.zeros_like(x)).sum(dim, keepdim=True)
    return total / valid.sum(dim, keepdim=True).clamp(min=1)


def flat_reward_mask(rewards: torch.Tensor, std_tolerance: float) -> torch.Tensor:
    """``[P, K]`` bool: reward k is flat (carries no ranking) within prompt p's group, among the scored samples."""
    scored = scored_samples(rewards)
    valid = None if bool(scored.all()) else scored.unsqueeze(-1).expand_as(rewards)
    return group_std(rewards, dim=1, valid=valid).squeeze(1) <= std_tolerance


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
    """Step 1 of the hierarchy: each reward z-scored within its group over the scored samples; a reward flat in a
    group gives 0 there, and so does a masked sample."""
    scored = scored_samples(rewards)
    if bool(scored.all()):  # the plain reductions, bit-identical to before masking existed
        std_k = group_std(rewards, dim=1)
        z = _standardise(rewards, rewards.mean(dim=1, keepdim=True), std_k, scale, eps, std_tolerance)
        return z.masked_fill(std_k <= std_tolerance, 0.0)
    valid = scored.unsqueeze(-1).expand_as(rewards)
    rewards = torch.where(valid, rewards, torch.zeros_like(rewards))
    std_k = group_std(rewards, dim=1, valid=valid)
    z = _standardise(rewards, group_mean(rewards, 1, valid), std_k, scale, eps, std_tolerance)
    return z.masked_fill((std_k <= std_tolerance) | ~valid, 0.0)


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

    A sample with a NaN reward (one a reward could not score) is masked: every mean and std is taken over the
    scored samples only, as if it were not in its group, and its advantage is 0.
    """
    if rewards.dim() != 3:
        raise ValueError(f"rewards must be [num_prompts, num_generations, num_rewards], got {tuple(rewards.shape)}")
    if torch.isinf(rewards).any():
        raise ValueError("rewards contain inf; validate them with rewards_to_tensor first")
    weights = torch.as_tensor(weights, dtype=rewards.dtype, device=rewards.device)
    if weights.shape != (rewards.shape[-1],):
        raise ValueError(f"got {weights.numel()} reward weights for {rewards.shape[-1]} rewards")
    if scale_rewards not in ("group", "batch", "none"):
        raise ValueError(f"scale_rewards must be 'group', 'batch' or 'none', got {scale_rewards!r}")
    scale = scale_rewards != "none"
    valid = scored_samples(rewards)
    everything_valid = bool(valid.all())

    if normalization == "hierarchical":
        z = normalize_per_reward(rewards, scale=scale, std_tolerance=std_tolerance, eps=eps)
        fused = (z * weights).sum(dim=-1)
    elif normalization == "sum_then_normalize":
        fused = (torch.where(valid.unsqueeze(-1), rewards, torch.zeros_like(rewards)) * weights).sum(dim=-1)
    else:
        raise ValueError(f"normalization must be 'hierarchical' or 'sum_then_normalize', got {normalization!r}")

    # with every sample scored the unmasked reductions are used, so figures stay bit-identical to before masking
    mask = None if everything_valid else valid
    group_centre = group_mean(fused, 1, mask)
    if scale_rewards == "batch":
        flat_valid = fused[valid]
        std = flat_valid.std() if flat_valid.numel() > 1 else torch.zeros((), dtype=fused.dtype)
        # Hierarchical fused values already have zero group means, so centring on the batch mean is the same thing
        # and matches TRL's normalize_then_sum bit for bit.
        centre = flat_valid.mean() if normalization == "hierarchical" and flat_valid.numel() else group_centre
    else:
        std = group_std(fused, dim=1, valid=mask)
        centre = group_centre
    advantages = _standardise(fused, centre, std, scale, eps, std_tolerance)
    return advantages if everything_valid else advantages.masked_fill(~valid, 0.0)


TOKEN_COMPOSITIONS = ("add", "redistribute")


def token_advantages(
    advantages: torch.Tensor,
    token_values: Sequence[torch.Tensor],
    touched: Sequence[torch.Tensor],
    weights: Sequence[float],
    *,
    composition: str = "add",
    std_tolerance: float = 1e-6,
    eps: float = 1e-4,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Per-token advantages ``[P, G, C]`` and each localised reward's term: the sequence-level ``advantages``
    ``[P, G]`` of every token, plus, for each localised reward k, the term ``w_k * z_k`` where ``z_k`` is its
    per-token value ``[P, G, C]`` z-scored within the group over the tokens it ``touched`` (0 elsewhere, and where
    the group's touched tokens do not vary).

    The sequence-level term says how good the utterance was; the localised one moves credit between tokens of the
    group: tokens in words the recogniser got wrong lose, tokens in words it got right gain, whatever the utterance's
    total. Normalising within the group makes the term's scale independent of the reward's units, as step 1 of the
    hierarchy does for sequence rewards. A sample with no touched token gets the sequence-level advantage only.

    ``composition``: ``"add"`` adds the term as it is, so a sample whose words were mostly right also gains on
    average; ``"redistribute"`` first subtracts each sample's own mean term over its touched tokens, so the term only
    moves credit between the tokens of one utterance and each sample's mean advantage stays the sequence-level one.
    """
    if not token_values:
        raise ValueError("token_advantages needs at least one localised reward")
    if composition not in TOKEN_COMPOSITIONS:
        raise ValueError(f"token credit composition must be one of {TOKEN_COMPOSITIONS}, got {composition!r}")
    terms = [weight * localised_term(values, mask, std_tolerance=std_tolerance, eps=eps)
             for values, mask, weight in zip(token_values, touched, weights, strict=True)]
    if composition == "redistribute":
        terms = [(term - group_mean(term, 2, mask.bool())).masked_fill(~mask.bool(), 0.0)
                 for term, mask in zip(terms, touched)]
    out = advantages.unsqueeze(-1).expand_as(token_values[0]).to(token_values[0].dtype).clone()
    for term in terms:
        out += term
    return out, terms


def localised_term(values: torch.Tensor, touched: torch.Tensor, *, std_tolerance: float = 1e-6,
                   eps: float = 1e-4) -> torch.Tensor:
    """One localised reward's per-token values ``[P, G, C]`` z-scored within each group over its touched tokens;
    0 on untouched tokens and in groups whose touched tokens do not vary."""
    if values.shape != touched.shape or values.dim() != 3:
        raise ValueError(f"token values {tuple(values.shape)} and touched {tuple(touched.shape)} must both be "
                         "[P, G, C]")
    p = values.shape[0]
    flat, mask = values.reshape(p, -1), touched.reshape(p, -1).bool()
    z = _standardise(flat, group_mean(flat, 1, mask), group_std(flat, 1, mask), True, eps, std_tolerance)
    return z.masked_fill(~mask, 0.0).view_as(values)
