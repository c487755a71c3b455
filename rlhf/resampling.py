"""Dynamic resampling of flat groups.

A group whose rewards are all equal has zero advantage everywhere, so its G rollouts cost a full forward and
backward for no gradient. GLM-TTS resamples such prompts. Which rewards count is configurable: the report leaves
speaker similarity out, since its tiny differences would make almost every group "non-flat" while the CER reward,
the one that matters, is constant. Resampling is bounded twice, per prompt (``max_rounds``) and per batch
(``max_total`` extra generations), so a batch of hopeless prompts cannot stall training.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from .advantages import flat_reward_mask


@dataclass
class ResampleConfig:
    enabled: bool = True  # regenerate the prompts of flat groups (every reward equal) before the update
    max_rounds: int = 3  # most regenerations of one prompt's group per step
    max_total: int | None = None  # extra generations per batch; None -> num_prompts * num_generations
    # rewards left out when judging flatness; GLM-TTS recipes name their speaker similarity here (``[sim]``, as the
    # report does), a default naming a reward could not fit every environment
    ignore: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.max_rounds < 0:
            raise ValueError(f"resample.max_rounds must be >= 0, got {self.max_rounds}")
        if self.max_total is not None and self.max_total < 0:
            raise ValueError(f"resample.max_total must be >= 0 or null, got {self.max_total}")


def flat_groups(
    rewards: torch.Tensor, names: Sequence[str], ignore: Sequence[str] = (), std_tolerance: float = 1e-6
) -> torch.Tensor:
    """``[P]`` bool: every reward not in ``ignore`` is flat in the prompt's group.

    If every reward is ignored nothing can be judged, so no group is called flat.
    """
    if rewards.shape[-1] != len(names):
        raise ValueError(f"{rewards.shape[-1]} reward columns but {len(names)} names")
    considered = [k for k, name in enumerate(names) if name not in set(ignore)]
    if not considered:
        return torch.zeros(rewards.shape[0], dtype=torch.bool)
    return flat_reward_mask(rewards[..., considered], std_tolerance).all(dim=-1)


def select_for_resampling(
    flat: torch.Tensor, rounds_done: torch.Tensor, *, max_rounds: int, budget_left: int, num_generations: int
) -> list[int]:
    """Prompts to resample in the next round: flat, under ``max_rounds``, first come first served within budget."""
    if flat.shape != rounds_done.shape:
        raise ValueError("flat and rounds_done must have the same shape")
    eligible = torch.nonzero(flat & (rounds_done < max_rounds)).flatten().tolist()
    affordable = max(budget_left, 0) // num_generations
    return eligible[:affordable]
