"""Linear schedules for the clip bounds and the sampling temperature.

GLM-TTS widens both clip bounds during training (eps_low 0.2 -> 0.3, eps_high 0.3 -> 0.5 over 1000 steps): early
updates stay close to the sampling policy, later ones may move further once rewards are less noisy. Temperature gets
the same treatment so exploration can be annealed. A value is a pure function of the global step, so resuming a run
needs nothing but the step.
"""

from __future__ import annotations

from dataclasses import dataclass


def linear(start: float, end: float, step: int, total_steps: int) -> float:
    """``start`` at step 0, ``end`` at ``total_steps`` and after, a straight line between."""
    if total_steps <= 0:
        return end
    fraction = min(max(step / total_steps, 0.0), 1.0)
    return start + (end - start) * fraction


@dataclass(frozen=True)
class StepHyperparams:
    epsilon: float
    epsilon_high: float
    temperature: float


@dataclass
class Schedule:
    """``[start, end]`` pairs; ``None`` keeps the constant value given to :meth:`at`."""

    epsilon: tuple[float, float] | None = None  # [start, end] of the lower clip bound, linear over the ramp
    epsilon_high: tuple[float, float] | None = None  # [start, end] of the upper clip bound, linear over the ramp
    temperature: tuple[float, float] | None = None  # [start, end] of the sampling temperature, linear over the ramp
    steps: int | None = None  # length of the ramp; None -> the run's max_steps

    def __post_init__(self) -> None:
        for name in ("epsilon", "epsilon_high", "temperature"):
            pair = getattr(self, name)
            if pair is not None:
                if len(pair) != 2:
                    raise ValueError(f"schedule.{name} must be [start, end], got {pair!r}")
                setattr(self, name, (float(pair[0]), float(pair[1])))
        if self.temperature is not None and min(self.temperature) <= 0:
            raise ValueError(f"schedule.temperature must stay > 0, got {self.temperature}")
        if self.epsilon is not None and not all(0 <= e < 1 for e in self.epsilon):
            raise ValueError(f"schedule.epsilon (the lower clip bound) must stay in [0, 1), got {self.epsilon}")
        if self.epsilon_high is not None and min(self.epsilon_high) < 0:
            raise ValueError(f"schedule.epsilon_high must stay >= 0, got {self.epsilon_high}")

    def at(self, step: int, total_steps: int, constants: StepHyperparams) -> StepHyperparams:
        ramp = self.steps if self.steps is not None else total_steps

        def value(pair: tuple[float, float] | None, constant: float) -> float:
            return constant if pair is None else linear(pair[0], pair[1], step, ramp)

        return StepHyperparams(
            epsilon=value(self.epsilon, constants.epsilon),
            epsilon_high=value(self.epsilon_high, constants.epsilon_high),
            temperature=value(self.temperature, constants.temperature),
        )
