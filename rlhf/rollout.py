"""The rollout environment contract.

The trainer never knows it is training a TTS model: an environment turns prompts into sampled token sequences
(with the sampler's log-probs), and a scorer turns those into named rewards. The GLM-TTS pipeline and the toy
environment used to test the algorithm are both just implementations of these two protocols.

Everything the trainer asks of them is declared here: besides ``rollout`` and ``score``, the figures each reports
for the step's metrics (``metrics``) and the scorer's table of samples (``sample_rows``). Those two have defaults
(nothing to report, no table) that an implementation gets by subclassing the protocol.

Samples are ordered group-major: sample ``i * G + g`` is generation ``g`` of prompt ``i``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch

from vocalign.policies.sampling import SamplingParams


@dataclass
class Rollouts:
    prompt_ids: torch.Tensor  # [N, P] left-padded
    prompt_mask: torch.Tensor  # [N, P]
    completion_ids: torch.Tensor  # [N, C] right-padded
    completion_mask: torch.Tensor  # [N, C]; 1 for sampled tokens, stop token included
    old_logps: torch.Tensor  # [N, C] sampler's log-probs at the sampling temperature
    num_generations: int
    extras: list[dict[str, Any]] = field(default_factory=list)  # per sample: what reward models need (audio, text)

    def __post_init__(self) -> None:
        n = self.completion_ids.shape[0]
        for name in ("prompt_ids", "prompt_mask", "completion_mask", "old_logps"):
            if getattr(self, name).shape[0] != n:
                raise ValueError(f"Rollouts.{name} has {getattr(self, name).shape[0]} rows, completion_ids has {n}")
        if self.completion_mask.shape != self.completion_ids.shape or self.old_logps.shape != self.completion_ids.shape:
            raise ValueError("completion_mask and old_logps must have the shape of completion_ids")
        if n % self.num_generations:
            raise ValueError(f"{n} samples are not whole groups of {self.num_generations}")
        if self.extras and len(self.extras) != n:
            raise ValueError(f"extras has {len(self.extras)} entries for {n} samples")

    def __len__(self) -> int:
        return self.completion_ids.shape[0]

    @property
    def num_prompts(self) -> int:
        return len(self) // self.num_generations

    def select_groups(self, groups: Sequence[int]) -> Rollouts:
        rows = [i * self.num_generations + g for i in groups for g in range(self.num_generations)]
        index = torch.tensor(rows, dtype=torch.long)
        return Rollouts(
            self.prompt_ids[index], self.prompt_mask[index], self.completion_ids[index],
            self.completion_mask[index], self.old_logps[index], self.num_generations,
            [self.extras[r] for r in rows] if self.extras else [],
        )

    def replace_groups(self, groups: Sequence[int], new: Rollouts) -> Rollouts:
        """A copy in which prompt ``groups[k]`` holds group ``k`` of ``new`` (a resample), order kept."""
        if new.num_prompts != len(groups):
            raise ValueError(f"{new.num_prompts} new groups for {len(groups)} replaced ones")
        position = {group: k for k, group in enumerate(groups)}
        parts = [new.select_groups([position[i]]) if i in position else self.select_groups([i])
                 for i in range(self.num_prompts)]
        return concat_rollouts(parts)


def _pad_to(x: torch.Tensor, width: int, value: float, left: bool) -> torch.Tensor:
    missing = width - x.shape[1]
    if missing <= 0:
        return x
    pad = x.new_full((x.shape[0], missing), value)
    return torch.cat([pad, x] if left else [x, pad], dim=1)


def concat_rollouts(parts: Sequence[Rollouts], pad_token_id: int = 0) -> Rollouts:
    """Concatenate rollouts of the same group size; prompts stay left-padded, completions right-padded."""
    if len({p.num_generations for p in parts}) != 1:
        raise ValueError("cannot concatenate rollouts with different num_generations")
    p_width = max(p.prompt_ids.shape[1] for p in parts)
    c_width = max(p.completion_ids.shape[1] for p in parts)
    return Rollouts(
        prompt_ids=torch.cat([_pad_to(p.prompt_ids, p_width, pad_token_id, True) for p in parts]),
        prompt_mask=torch.cat([_pad_to(p.prompt_mask, p_width, 0, True) for p in parts]),
        completion_ids=torch.cat([_pad_to(p.completion_ids, c_width, pad_token_id, False) for p in parts]),
        completion_mask=torch.cat([_pad_to(p.completion_mask, c_width, 0, False) for p in parts]),
        old_logps=torch.cat([_pad_to(p.old_logps, c_width, 0.0, False) for p in parts]),
        num_generations=parts[0].num_generations,
        extras=[e for p in parts for e in p.extras],
    )


@runtime_checkable
class RolloutEnv(Protocol):
    """Samples ``num_generations`` completions for each prompt with ``model``."""

    def rollout(
        self, model: torch.nn.Module, prompts: Sequence[Any], num_generations: int, sampling: SamplingParams
    ) -> Rollouts: ...

    def metrics(self) -> dict[str, float]:
        """Figures of the latest :meth:`rollout` logged with the step (e.g. ``time/speech_lm_s``); none by default."""
        return {}


@runtime_checkable
class Scorer(Protocol):
    """Scores rollouts; returns one list of floats per reward name, aligned with the samples."""

    reward_names: Sequence[str]

    def score(self, rollouts: Rollouts) -> Mapping[str, Sequence[float | None]]: ...

    def metrics(self) -> dict[str, float]:
        """Figures of the latest :meth:`score` logged with the step (e.g. ``time/rewards_s``); none by default."""
        return {}

    def sample_rows(self, rollouts: Rollouts, n: int) -> list[dict[str, Any]]:
        """Up to ``n`` scored samples of ``rollouts`` as rows of the tracker's completion table: ``audio`` and
        ``sample_rate`` (logged as audio) and any text or number columns. Each row must come from the sample's own
        results (``extras``), so that a resampled group cannot pair a sample with another's rewards. No table by
        default."""
        return []
