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
    assert scorer.score(first) == {"length": [10.0, 11.0, 20.0, 21.0]}
    fresh = rollouts([30, 31])
    scorer.score(fresh)  # the resample of group 0 is scored after the first batch
    merged = first.replace_groups([0], fresh)
    rows = scorer.sample_rows(merged, 4)
    assert [(len(r["audio"]), r["length"], r["transcript"]) for r in rows] == [
        (30, 30.0, "30 samples"), (31, 31.0, "31 samples"), (20, 20.0, "20 samples"), (21, 21.0, "21 samples")]
