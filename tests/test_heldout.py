"""Held-out evaluation: per-seed means, spread and relative change by hand, on a test-double environment."""

import json

import numpy as np
import pytest
import soundfile as sf
import torch

from vocalign.eval.heldout import HeldoutSettings, PolicyScores, compare, score_policy
from vocalign.rewards.base import RewardResult
from vocalign.rlhf.rollout import Rollouts


class NoisyEnv:
    """Test double: audio whose length in samples is 100 * the text's characters plus a torch-random jitter."""

    def rollout(self, model, prompts, num_generations, sampling):
        n = len(prompts) * num_generations
        extras = []
        for row in prompts:
            length = 100 * len(row["text"]) + int(torch.randint(0, 50, ()).item())
            extras.append({"audio": np.full(length, 0.1, np.float32), "sample_rate": 1000, "text": row["text"],
                           "language": "en", "prompt_audio": None, "prompt_sample_rate": None, "emotion": None})
        empty = torch.zeros(n, 1, dtype=torch.long)
        return Rollouts(empty, empty, empty, empty, empty.float(), num_generations, extras)


class LengthCER:
    """Test double for the cer plugin: 'error rate' is the audio's length modulo 7, over 10."""

    name = "cer"

    def score(self, samples):
        return [RewardResult(1.0 - (len(s.audio) % 7) / 10, {"cer": (len(s.audio) % 7) / 10, "transcript": "t"})
                for s in samples]


ROWS = [{"text": "one two"}, {"text": "three"}, {"text": "four five six"}]


def test_scores_are_per_seed_and_reproducible():
    settings = HeldoutSettings(seeds=[0, 1], batch_size=2, save_wavs=2)
    model = torch.nn.Linear(1, 1)
    first = score_policy(NoisyEnv(), model, ROWS, [LengthCER()], settings)
    again = score_policy(NoisyEnv(), model, ROWS, [LengthCER()], settings)
    assert first.per_seed == again.per_seed and len(first.rows) == 6 and len(first.audio) == 2
    seed0 = [r for r in first.rows if r["seed"] == 0]
    assert first.per_seed[0]["error_rate"] == pytest.approx(np.mean([r["error_rate"] for r in seed0]))
    assert first.per_seed[0]["seconds_per_char_median"] == pytest.approx(
        np.median([r["seconds"] / len(r["text"]) for r in seed0]))
    assert model.training  # left as it was found


def test_summary_and_comparison_by_hand(tmp_path):
    def scores(per_seed):
        return PolicyScores(rows=[{"seed": s, "text": "x"} for s in per_seed], per_seed=per_seed,
                            audio=[(np.zeros(160, np.float32), 16000)])

    before = scores({0: {"error_rate": 0.5, "sim": 0.60, "seconds_per_char_median": 0.10},
                     1: {"error_rate": 0.3, "sim": 0.62, "seconds_per_char_median": 0.10}})
    after = scores({0: {"error_rate": 0.2, "sim": 0.61, "seconds_per_char_median": 0.11},
                    1: {"error_rate": 0.2, "sim": 0.61, "seconds_per_char_median": 0.09}})
    assert before.summary()["error_rate"] == pytest.approx(0.4)
    assert before.summary()["error_rate/seed_spread"] == pytest.approx(0.2)
    assert before.summary()["error_rate/per_seed"] == [0.5, 0.3]
    report = compare({"sft": before, "grpo": after}, tmp_path)
    assert report["relative_change"]["error_rate"] == pytest.approx((0.2 - 0.4) / 0.4)
    assert report["relative_change"]["seconds_per_char_median"] == pytest.approx(0.0)
    assert report["sim_change"] == pytest.approx(0.0)
    assert json.loads((tmp_path / "eval.json").read_text()) == report
    assert "| sft | 0.4000 [0.5000, 0.3000] |" in (tmp_path / "eval.md").read_text()
    assert sf.info(tmp_path / "eval_wavs" / "grpo" / "0.wav").samplerate == 16000


def test_settings_are_checked():
    with pytest.raises(ValueError, match="at least one seed"):
        HeldoutSettings(seeds=[])
