"""The reward scorer keeps each sample's results with the sample, through resampling."""

import numpy as np
import torch

from vocalign.rewards.base import RewardResult
from vocalign.rewards.scorer import RewardScorer
from vocalign.rlhf.rollout import Rollouts


class LengthReward:
    """Test double: the value is the audio's length; the 'transcript' names it."""

    name = "length"

    def score(self, samples):
        return [RewardResult(float(len(s.audio)), {"transcript": f"{len(s.audio)} samples"}) for s in samples]


def rollouts(lengths, g=2):
    n = len(lengths)
    ids = torch.zeros(n, 1, dtype=torch.long)
    extras = [{"audio": np.zeros(k, np.float32), "sample_rate": 16000, "text": f"t{k}", "language": "en"}
              for k in lengths]
    return Rollouts(ids, ids, ids, ids, ids.float(), g, extras)


def test_table_rows_keep_their_own_rewards_after_a_group_is_resampled():
    scorer = RewardScorer([LengthReward()])
    first = rollouts([10, 11, 20, 21])
    assert scorer.score(first).rewards == {"length": [10.0, 11.0, 20.0, 21.0]}
    fresh = rollouts([30, 31])
    scorer.score(fresh)  # the resample of group 0 is scored after the first batch
    merged = first.replace_groups([0], fresh)
    rows = scorer.sample_rows(merged, 4)
    assert [(len(r["audio"]), r["length"], r["transcript"]) for r in rows] == [
        (30, 30.0, "30 samples"), (31, 31.0, "31 samples"), (20, 20.0, "20 samples"), (21, 21.0, "21 samples")]


class FloorReward(LengthReward):
    """Test double: LengthReward that declares its minimum, records which audio lengths it was handed and refuses
    9-sample audio as a server would (failed)."""

    name = "floor"
    min_value = -1.0

    def __init__(self):
        self.seen = []

    def score(self, samples):
        self.seen += [len(s.audio) for s in samples]
        return [RewardResult.failed("refused") if len(s.audio) == 9 else r
                for s, r in zip(samples, super().score(samples))]


class NeedsFloorDouble:
    """Test double: requires `floor` and reports how many upstream results it was given."""

    name = "needs_floor"
    requires = ("floor",)

    def score(self, samples, upstream):
        return [RewardResult(float(len(upstream["floor"])), {}) for _ in samples]


def test_bad_samples_are_judged_before_any_plugin_sees_them():
    """Empty or over-long audio is the policy's fault (invalid, at each plugin's minimum); NaN audio is the
    pipeline's (failed, NaN, masked); a plugin whose requirement failed on a sample fails it too."""
    floor, needs = FloorReward(), NeedsFloorDouble()
    scorer = RewardScorer([floor, needs])
    batch = rollouts([0, 16000 * 61, 5, 7, 9, 11])
    batch.extras[3]["audio"] = np.full(7, np.nan, np.float32)
    scores = scorer.score(batch)
    assert floor.seen == [5, 9, 11]  # only the scoreable samples reached the plugin
    nan = float("nan")
    assert np.array_equal(scores.rewards["floor"], [-1.0, -1.0, 5.0, nan, nan, 11.0], equal_nan=True)
    assert scores.invalid["floor"] == [True, True, False, False, False, False]
    # needs_floor scored samples 2 and 5 only (two upstream results handed to it); its own minimum is 0.0
    assert np.array_equal(scores.rewards["needs_floor"], [0.0, 0.0, 2.0, nan, nan, 2.0], equal_nan=True)
    statuses = [e["scores"]["needs_floor"].status for e in batch.extras]
    assert statuses == ["invalid", "invalid", "ok", "failed", "failed", "ok"]
    assert batch.extras[4]["scores"]["needs_floor"].reason == "floor could not score it"


class SpanDouble(LengthReward):
    """Test double: one span over the first 0.1 s of every sample."""

    name = "spans"

    def score(self, samples):
        return [RewardResult(1.0, {}, spans=[(0.0, 0.1, -1.0)]) for _ in samples]


def test_spans_reach_the_trainer_per_sample():
    scores = RewardScorer([SpanDouble()]).score(rollouts([1600, 0]))
    assert scores.spans == {"spans": [[(0.0, 0.1, -1.0)], []]}  # the empty sample was never scored: no spans
