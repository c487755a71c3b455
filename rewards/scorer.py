"""Reward plugins built from a config's reward list, and the scorer that runs them over a batch of rollouts.

Both belong to ``rewards`` rather than to the trainer: evaluation builds the same plugins from the same specs, and
the scorer knows utterances (audio, text, transcripts), which the trainer never does. The scorer satisfies the
trainer's ``Scorer`` protocol (``vocalign.rlhf.rollout``) by shape; it reads only the per-sample ``extras`` of the
batch it is given, so this package needs nothing from ``rlhf``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from .base import FAILED, INVALID, RewardPlugin, Sample, Span, build_reward, score_all
from .client import RemoteReward

logger = logging.getLogger(__name__)


def build_plugin(spec: Mapping[str, Any]) -> RewardPlugin:
    """``{name: cer, ...settings}`` in-process, ``{name: sim, urls: [...], ...client settings}`` via servers, or
    ``{name: mine, target: pkg.module:Class, ...}``."""
    spec = dict(spec)
    name = spec.pop("name", None)
    if not name:
        raise ValueError(f"a reward entry needs a name: {spec}")
    if "urls" in spec:
        return RemoteReward(name, spec.pop("urls"), **spec)
    return build_reward(name, spec.pop("target", None), **spec)


class ScoredBatch(Protocol):
    """What the scorer reads of a batch: one mapping of :class:`Sample` fields per sample (rollouts' extras)."""

    extras: list[dict[str, Any]]


@dataclass
class RewardScores:
    """The trainer's ``Scores`` by shape: values per reward (NaN where a sample failed, masked by the trainer) and
    which samples were invalid (the policy's fault, valued at the reward's minimum)."""

    rewards: dict[str, list[float]]
    invalid: dict[str, list[bool]]
    spans: dict[str, list[list[Span]]]  # per reward, per sample: where it found what it scored (seconds of audio)


class RewardScorer:
    """Scores batches whose extras describe utterances (see ``vocalign.rlhf.tts_env.TTSEnv``) with reward plugins.

    Each sample's results (value and info, e.g. the transcript) are stored in its extras under ``scores``, so they
    travel with the sample when groups are resampled and replaced, and a table of samples cannot mispair them."""

    def __init__(self, plugins: Sequence[RewardPlugin]) -> None:
        if not plugins:
            raise ValueError("no rewards configured")
        self.plugins = list(plugins)
        self.reward_names = [p.name for p in self.plugins]
        self._timing = 0.0

    def score(self, rollouts: ScoredBatch) -> RewardScores:
        samples = [Sample.from_mapping(e) for e in rollouts.extras]
        t0 = time.perf_counter()
        results = score_all(self.plugins, samples)
        self._timing = time.perf_counter() - t0
        for i, extra in enumerate(rollouts.extras):
            extra["scores"] = {name: scored[i] for name, scored in results.items()}
        for name, scored in results.items():
            failed = [(i, r.reason) for i, r in enumerate(scored) if r.status == FAILED]
            if failed:
                logger.warning("reward %r could not score %d of %d samples (masked), e.g. sample %d: %s", name,
                               len(failed), len(scored), *failed[0])
        return RewardScores({name: [r.value for r in scored] for name, scored in results.items()},
                            {name: [r.status == INVALID for r in scored] for name, scored in results.items()},
                            {name: [list(r.spans) for r in scored] for name, scored in results.items()})

    def sample_rows(self, rollouts: ScoredBatch, n: int) -> list[dict[str, Any]]:
        """The first ``n`` scored samples of ``rollouts``, for a table of audio, text, rewards and transcripts."""
        rows = []
        for extra in rollouts.extras[:n]:
            row: dict[str, Any] = {"audio": extra["audio"], "sample_rate": extra["sample_rate"], "text": extra["text"]}
            for name, result in extra.get("scores", {}).items():
                row[name] = result.value
                if "transcript" in result.info:
                    row["transcript"] = result.info["transcript"]
            rows.append(row)
        return rows

    def metrics(self) -> dict[str, float]:
        """Seconds the latest :meth:`score` took, and each reward server pool's failed attempts so far."""
        out = {"time/rewards_s": self._timing}
        for plugin in self.plugins:
            if isinstance(plugin, RemoteReward):
                out[f"reward_servers/{plugin.name}/failed_attempts"] = float(plugin.client.stats.failed_attempts)
        return out
