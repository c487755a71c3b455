"""Resuming checks the checkpoint's settings: a changed recipe stops with the keys named, unless `resume: force`."""

import logging

import pytest
import torch

from vocalign.rlhf.checkpointing import save_checkpoint
from vocalign.rlhf.config import GRPOConfig
from vocalign.rlhf.toy_env import ToyConfig, build_toy_model
from vocalign.rlhf.training_setup import prepare_training, resume


def config(tmp_path, **changes):
    settings = {"output_dir": str(tmp_path), "max_steps": 10, "prompts_per_step": 2, "num_generations": 4,
                "micro_batch_size": 8, "learning_rate": 1e-3, "report_to": "none", "reward_weights": {"hits": 1.0}}
    return GRPOConfig(**{**settings, **changes})


def checkpointed_run(tmp_path):
    """A setup whose step-3 checkpoint holds its config; returns the policy's weights as saved."""
    setup = prepare_training(build_toy_model(ToyConfig()), config(tmp_path))
    with torch.no_grad():
        for p in setup.model.parameters():
            p.add_(1.0)
    save_checkpoint(setup.accelerator, tmp_path, 3, {"lr_scheduler": setup.lr_scheduler.state_dict(),
                                                     "wandb_id": "run-a"}, keep=None, config=setup.config)
    return {k: v.clone() for k, v in setup.model.state_dict().items()}


def test_changed_settings_stop_the_resume_naming_each_with_both_values(tmp_path):
    checkpointed_run(tmp_path)
    changed = config(tmp_path, learning_rate=2e-3, reward_weights={"hits": 0.5},
                     max_steps=20, save_steps=5, run_name="longer")  # the last three may change
    setup = prepare_training(build_toy_model(ToyConfig()), changed)
    with pytest.raises(ValueError) as err:
        resume(setup, tmp_path)
    message = str(err.value)
    assert "learning_rate: 0.001 in the checkpoint, 0.002 now" in message
    assert "reward_weights.hits: 1.0 in the checkpoint, 0.5 now" in message
    assert "checkpoint-3" in message and "trainer.resume=force" in message
    assert not any(key in message for key in ("max_steps", "save_steps", "run_name"))


def test_force_continues_from_the_checkpoint_and_warns(tmp_path, caplog):
    saved = checkpointed_run(tmp_path)
    setup = prepare_training(build_toy_model(ToyConfig()), config(tmp_path, learning_rate=2e-3, resume="force"))
    with caplog.at_level(logging.WARNING, logger="vocalign.rlhf.training_setup"):
        assert resume(setup, tmp_path) == (3, "run-a")
    assert "learning_rate: 0.001 in the checkpoint, 0.002 now" in caplog.text
    for key, value in setup.model.state_dict().items():
        assert torch.equal(value, saved[key]), key


def test_longer_run_with_other_logging_resumes_without_a_word(tmp_path, caplog):
    checkpointed_run(tmp_path)
    setup = prepare_training(build_toy_model(ToyConfig()),
                             config(tmp_path, max_steps=40, logging_steps=5, save_total_limit=None))
    with caplog.at_level(logging.WARNING):
        assert resume(setup, tmp_path) == (3, "run-a")
    assert "settings" not in caplog.text


def test_resume_takes_true_false_or_force_only():
    assert GRPOConfig(resume="force").resume == "force" and GRPOConfig(resume=False).resume is False
    with pytest.raises(ValueError, match='resume must be true, false or "force", got \'yes\''):
        GRPOConfig(resume="yes")


def test_the_trainers_own_checkpoints_carry_the_config_a_resume_checks(tmp_path):
    from vocalign.rlhf.resampling import ResampleConfig
    from vocalign.rlhf.toy_env import ToyEnv, ToyScorer, toy_prompts
    from vocalign.rlhf.trainer import GRPOTrainer

    toy = ToyConfig()

    def trainer(**changes):
        settings = dict(max_steps=1, save_steps=1, max_completion_length=4, reward_weights={},
                        resample=ResampleConfig(enabled=False))
        cfg = config(tmp_path, **{**settings, **changes})
        return GRPOTrainer(build_toy_model(toy), ToyEnv(toy), ToyScorer(toy), toy_prompts(toy), cfg)

    trainer().train()
    with pytest.raises(ValueError, match="temperature: 1.0 in the checkpoint, 0.7 now"):
        trainer(max_steps=2, temperature=0.7).train()
