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

from ..common.generation import SamplingParams


@dataclass
class Rollouts:
    prompt_ids: torch.Tensor  # [N, P] left-padded
    prompt_mask: torch.Tensor  # [N, P]
    completion_ids: torch.Tensor  # [N, C] right-padded
    completion_mask: torch.Tensor  # [N, C]; 1 for sampled tokens, stop token included
    old_logps: torch.Tensor  # [N, C] sampler's log-probs at the sampling temperature
    num_generations: int
    extras: list[dict[str, Any]] = field(default_factory=list)  # per sample: what reward models need (audio, text)
    # What the sampler knew and the metrics report; an environment that has them should pass them on.
    entropies: torch.Tensor | None = None  # [N, C] entropy of the sampling distribution at each token
    stopped: torch.Tensor | None = None  # [N] bool: ended with the stop token; False means it hit the length cap

    def __post_init__(self) -> None:
        n = self.completion_ids.shape[0]
        for name in ("prompt_ids", "prompt_mask", "completion_mask", "old_logps"):
            if getattr(self, name).shape[0] != n:
                raise ValueError(f"Rollouts.{name} has {getattr(self, name).shape[0]} rows, completion_ids has {n}")
        for name in ("completion_mask", "old_logps", "entropies"):
            value = getattr(self, name)
            if value is not None and value.shape != self.completion_ids.shape:
                raise ValueError(f"Rollouts.{name} must have the shape of completion_ids "
                                 f"{tuple(self.completion_ids.shape)}, got {tuple(value.shape)}")
        if self.stopped is not None and self.stopped.shape != (n,):
            raise ValueError(f"Rollouts.stopped must have shape ({n},), got {tuple(self.stopped.shape)}")
        if n % self.num_generations:
            raise ValueError(f"{n} samples are not whole groups of {self.num_generations}")
        if self.extras and len(self.extras) != n:
            raise ValueError(f"extras has {len(self.extras)} entries for {n} samples")

    def __len__(self) -> int:
        return self.completion_ids.shape[0]

    @property
    def num_prompts(self) -> int:
        return len(self) // self.num_generations

    @property
    def truncated(self) -> torch.Tensor:
        """[N] bool: samples that ended at the length cap (none when the environment does not say)."""
        if self.stopped is None:
            return torch.zeros(len(self), dtype=torch.bool)
        return ~self.stopped.bool().cpu()

    def select_groups(self, groups: Sequence[int]) -> Rollouts:
        rows = [i * self.num_generations + g for i in groups for g in range(self.num_generations)]
        index = torch.tensor(rows, dtype=torch.long)
        return Rollouts(
            self.prompt_ids[index], self.prompt_mask[index], self.completion_ids[index],
            self.completion_mask[index], self.old_logps[index], self.num_generations,
            [self.extras[r] for r in rows] if self.extras else [],
            None if self.entropies is None else self.entropies[index],
            None if self.stopped is None else self.stopped[index],
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

    def optional(name: str, pad: bool) -> torch.Tensor | None:
        values = [getattr(p, name) for p in parts]
        if any(v is None for v in values):
            return None
        return torch.cat([_pad_to(v, c_width, 0.0, False) if pad else v for v in values])

    return Rollouts(
        prompt_ids=torch.cat([_pad_to(p.prompt_ids, p_width, pad_token_id, True) for p in parts]),
        prompt_mask=torch.cat([_pad_to(p.prompt_mask, p_width, 0, True) for p in parts]),
        completion_ids=torch.cat([_pad_to(p.completion_ids, c_width, pad_token_id, False) for p in parts]),
        completion_mask=torch.cat([_pad_to(p.completion_mask, c_width, 0, False) for p in parts]),
        old_logps=torch.cat([_pad_to(p.old_logps, c_width, 0.0, False) for p in parts]),
        num_generations=parts[0].num_generations,
        extras=[e for p in parts for e in p.extras],
        entropies=optional("entropies", pad=True),
        stopped=optional("stopped", pad=False),
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

    def localise(self, rollouts: Rollouts, spans: Sequence[Sequence[tuple[float, float, float]]]
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-token values and touched flags ``[N, C]`` (aligned with ``completion_mask``) for each sample's spans
        (``(start, end, value)`` over its output, e.g. seconds of audio): only the environment knows which tokens
        made which stretch of output. Needed for ``token_reward_weights``; environments without it refuse."""
        raise NotImplementedError(f"{type(self).__name__} cannot map reward spans to tokens; remove "
                                  "trainer.token_reward_weights or implement RolloutEnv.localise")


@dataclass
class Scores:
    """What a scorer may return instead of a plain mapping, when some samples could not be scored normally.

    ``rewards``: per reward, one value per sample; NaN (or None) where the sample could not be scored for reasons
    outside the policy (a server refused it, a model failed): the trainer masks such samples out of advantages and
    loss. ``invalid``: per reward, which samples the policy is to blame for (empty audio, too long, no speech); those
    keep a real value (the reward's minimum) and are trained on, and only counted here."""

    rewards: Mapping[str, Sequence[float | None]]
    invalid: Mapping[str, Sequence[bool]] = field(default_factory=dict)
    # per reward, per sample: where in the sample's output the reward found what it scored, as (start, end, value)
    # in the environment's units (seconds of audio for TTS); see RolloutEnv.localise
    spans: Mapping[str, Sequence[Sequence[tuple[float, float, float]]]] = field(default_factory=dict)


@runtime_checkable
class Scorer(Protocol):
    """Scores rollouts: one value per sample for each reward name, as a mapping or as :class:`Scores` (any object
    with its two fields will do, so a scorer need not import the trainer)."""

    reward_names: Sequence[str]

    def score(self, rollouts: Rollouts) -> Mapping[str, Sequence[float | None]] | Scores: ...

    def metrics(self) -> dict[str, float]:
        """Figures of the latest :meth:`score` logged with the step (e.g. ``time/rewards_s``); none by default."""
        return {}

    def sample_rows(self, rollouts: Rollouts, n: int) -> list[dict[str, Any]]:
        """Up to ``n`` scored samples of ``rollouts`` as rows of the tracker's completion table: ``audio`` and
        ``sample_rate`` (logged as audio) and any text or number columns. Each row must come from the sample's own
        results (``extras``), so that a resampled group cannot pair a sample with another's rewards. No table by
        default."""
        return []
