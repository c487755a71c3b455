"""The GLM-TTS environment in the loop on a tiny random checkpoint: every group resampled once, and the completion
table still pairs each sample's audio with its own rewards."""

import numpy as np
import pytest

from vocalign.common.audio import write_audio
from vocalign.policies.checkpoints import write_tiny_checkpoint
from vocalign.policies.pipeline import TTSPipeline
from vocalign.rewards.base import RewardResult, Sample
from vocalign.rewards.energy import EnergyReward
from vocalign.rewards.scorer import RewardScorer
from vocalign.rlhf.config import GRPOConfig
from vocalign.rlhf.resampling import ResampleConfig
from vocalign.rlhf.trainer import GRPOTrainer
from vocalign.rlhf.tts_env import TTSEnv, load_prompt_rows

pytestmark = pytest.mark.slow


class FlatFirst:
    """Test double: 0.5 for every sample of the first batch it scores (every group flat), then the sample's length."""

    name = "flat_first"

    def __init__(self):
        self.calls = 0

    def score(self, samples):
        self.calls += 1
        return [RewardResult(0.5 if self.calls == 1 else float(len(s.audio))) for s in samples]


def test_resampled_groups_keep_their_own_rewards_in_the_completion_table(tmp_path):
    pipeline = TTSPipeline.from_pretrained(write_tiny_checkpoint(tmp_path / "ckpt"))
    write_audio(tmp_path / "voice.wav", (0.1 * np.sin(np.arange(16000) / 7)).astype(np.float32), 16000)
    (tmp_path / "prompts.jsonl").write_text(
        '{"text": "hello world", "language": "en", "prompt_wav": "voice.wav", "prompt_text": "hi"}\n'
        '{"text": "good morning", "language": "en", "prompt_wav": "voice.wav", "prompt_text": "hi"}\n')
    energy, flat_first = EnergyReward(), FlatFirst()
    scorer = RewardScorer([energy, flat_first])
    config = GRPOConfig(output_dir=str(tmp_path / "run"), max_steps=1, prompts_per_step=2, num_generations=2,
                        micro_batch_size=4, max_completion_length=20, learning_rate=1e-4, report_to="wandb",
                        log_completions=4, resample=ResampleConfig(ignore=["energy"]))
    trainer = GRPOTrainer(pipeline.lm.model, TTSEnv(pipeline), scorer, load_prompt_rows(tmp_path / "prompts.jsonl"),
                          config)
    (metrics,) = trainer.train()
    assert metrics["resample/groups"] == 2 and flat_first.calls == 2  # both groups were replaced by a resample
    assert metrics["time/token_to_audio_s"] > 0 and "time/rewards_s" in metrics  # the env's and scorer's figures
    rows = scorer.sample_rows(trainer.last_rollouts, 4)
    assert len(rows) == 4
    for row in rows:
        assert row["flat_first"] == float(len(row["audio"]))  # from the resample, not the first batch
        assert row["energy"] == energy.score([Sample(row["audio"], row["sample_rate"], row["text"], "en")])[0].value
    assert len(list((tmp_path / "run" / "wandb").rglob("*.wav"))) == 4  # the table's audio went to the offline run

