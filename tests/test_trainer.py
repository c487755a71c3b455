"""The training loop on the toy environment: it learns, it resamples within bounds, LoRA and KL work."""

import pytest
import torch

from vocalign.common.settings import from_dict
from vocalign.launch.recipe import load_recipe
from vocalign.rlhf.config import GRPOConfig, LoraSettings
from vocalign.rlhf.resampling import ResampleConfig
from vocalign.rlhf.rollout import Scorer
from vocalign.rlhf.toy_env import ToyConfig, ToyEnv, ToyScorer, build_toy_model, toy_prompts
from vocalign.rlhf.trainer import GRPOTrainer

from .conftest import REPO


def make_trainer(tmp_path, scorer=None, **overrides):
    toy = ToyConfig()
    settings = {"output_dir": str(tmp_path / "run"), "max_steps": 30, "prompts_per_step": 4, "num_generations": 8,
                "micro_batch_size": 16, "learning_rate": 3e-3, "max_completion_length": 8, "report_to": "none",
                "reward_weights": {"hits": 1.0, "sim": 0.1}, "save_steps": 1000}
    settings.update(overrides)
    return GRPOTrainer(build_toy_model(toy), ToyEnv(toy), scorer or ToyScorer(toy), toy_prompts(toy),
                       GRPOConfig(**settings))


def test_toy_recipe_reaches_the_reward_the_readme_states(tmp_path):
    run, config = load_recipe(REPO / "configs" / "grpo_toy.yaml",
                              [f"trainer.output_dir={tmp_path / 'run'}", "trainer.report_to=none"])
    history = GRPOTrainer(run.model, run.env, run.scorer, run.prompts, config).train()
    hits = [m["rewards/hits/mean"] for m in history]
    # README: "from about 0.2 to above 0.9 in 40 steps" (random policy: 3 target tokens of 16 -> about 0.19)
    assert len(hits) == 40 and sum(hits[:5]) / 5 < 0.35 and sum(hits[-5:]) / 5 > 0.9, hits
    assert history[-1]["schedule/epsilon_high"] > history[0]["schedule/epsilon_high"]
    assert (tmp_path / "run" / "metrics.jsonl").read_text().count("\n") == 40


class FlatScorerDouble(Scorer):
    """Test double: `hits` is constant for prompt groups listed in `flat`; `sim` varies everywhere."""

    reward_names = ("hits", "sim")

    def __init__(self):
        self.calls = 0

    def score(self, rollouts):
        self.calls += 1
        n = len(rollouts)
        return {"hits": [0.5] * n, "sim": [float(i % 3) for i in range(n)]}


def test_flat_groups_are_resampled_within_bounds_then_zeroed(tmp_path):
    scorer = FlatScorerDouble()
    trainer = make_trainer(tmp_path, scorer, resample=ResampleConfig(max_rounds=3, max_total=40, ignore=["sim"]))
    prompts = trainer.prompts_for_step(0)
    from vocalign.rlhf.rollout import SamplingParams

    rollouts, _, _, _, rounds, still_flat = trainer.generate_and_score(prompts, SamplingParams(max_new_tokens=8))
    # budget 40 generations with G=8 -> 5 group resamples: 4 in round one, 1 in round two
    assert rounds.tolist() == [2, 1, 1, 1]
    assert scorer.calls == 3 and still_flat.all() and len(rollouts) == 32
    metrics = trainer.train_step(prompts, trainer.config.schedule.at(0, 30, _constants(trainer)))
    assert metrics["advantage/max"] == 0 and metrics["advantage/min"] == 0  # sim varies but the group is flat
    assert metrics["resample/extra_generations"] == 40
    assert metrics["resample/still_flat_frac"] == 1.0


def _constants(trainer):
    from vocalign.rlhf.schedules import StepHyperparams

    c = trainer.config
    return StepHyperparams(c.epsilon, c.epsilon_high, c.temperature)


def test_resampling_off_leaves_groups_alone(tmp_path):
    scorer = FlatScorerDouble()
    trainer = make_trainer(tmp_path, scorer, resample=ResampleConfig(enabled=False))
    from vocalign.rlhf.rollout import SamplingParams

    _, _, _, _, rounds, still_flat = trainer.generate_and_score(trainer.prompts_for_step(0), SamplingParams(max_new_tokens=8))
    assert scorer.calls == 1 and rounds.sum() == 0 and not still_flat.any()


def test_lora_with_kl_trains_only_the_adapter(tmp_path):
    trainer = make_trainer(tmp_path, max_steps=3, beta=0.1, lora=LoraSettings(r=4, lora_alpha=8, lora_dropout=0.0),
                           num_iterations=2)
    model = trainer.accelerator.unwrap_model(trainer.model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    history = trainer.train()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all("lora_" in n for n in changed)
    assert history[-1]["kl"] > 0  # the adapter moved the policy away from the reference (adapter off)


def test_prompts_are_a_function_of_the_step(tmp_path):
    trainer = make_trainer(tmp_path)
    assert trainer.prompts_for_step(5) == trainer.prompts_for_step(5)
    seen = [tuple(p["prompt_ids"]) for step in range(16) for p in trainer.prompts_for_step(step)]
    assert len(set(seen)) == 64  # 16 steps x 4 prompts cover the 64 prompts once per epoch


def test_config_errors_are_clear(tmp_path):
    with pytest.raises(ValueError, match=r"'epsilon_hgih' \(did you mean 'epsilon_high'\?\)"):
        from_dict(GRPOConfig, {"epsilon_hgih": 0.3})
    with pytest.raises(ValueError, match="reward_weights names \\['cer'\\]"):
        make_trainer(tmp_path, reward_weights={"cer": 1.0})
    with pytest.raises(ValueError, match="resample.ignore names \\['emotion'\\]"):
        make_trainer(tmp_path, resample=ResampleConfig(ignore=["emotion"]))
    with pytest.raises(ValueError, match="epsilon"):
        GRPOConfig(epsilon=1.5)
    with pytest.raises(ValueError, match="save_total_limit must be >= 1"):
        GRPOConfig(save_total_limit=0)
    cfg = from_dict(GRPOConfig, {"learning_rate": "1e-6", "schedule": {"epsilon": [0.2, 0.3]}})
    assert cfg.learning_rate == 1e-6 and cfg.schedule.epsilon == (0.2, 0.3)


def test_env_and_scorer_figures_reach_the_step_metrics(tmp_path):
    """What the protocols declare (`metrics()` of env and scorer) is logged with the step; the defaults add nothing."""

    class TimedEnv(ToyEnv):
        def metrics(self):
            return {"time/toy_stage_s": 0.25}

    class CountingScorer(ToyScorer):
        calls = 0

        def score(self, rollouts):
            self.calls += 1
            return super().score(rollouts)

        def metrics(self):
            return {"toy/score_calls": float(self.calls)}

    toy = ToyConfig()
    config = GRPOConfig(output_dir=str(tmp_path / "run"), max_steps=1, prompts_per_step=2, num_generations=4,
                        micro_batch_size=8, max_completion_length=4, report_to="none", resample=ResampleConfig(enabled=False))
    trainer = GRPOTrainer(build_toy_model(toy), TimedEnv(toy), CountingScorer(toy), toy_prompts(toy), config)
    (metrics,) = trainer.train()
    assert metrics["time/toy_stage_s"] == 0.25 and metrics["toy/score_calls"] == 1.0
    plain = make_trainer(tmp_path / "plain", max_steps=1, prompts_per_step=2, num_generations=4)
    assert not {k for k in plain.train()[0] if k.startswith("toy/") or k == "time/toy_stage_s"}


class HitsOnlyScorer(ToyScorer):
    """Test double: the toy's `hits` alone, as an environment whose rewards include nothing called `sim`."""

    reward_names = ("hits",)

    def score(self, rollouts):
        return {"hits": super().score(rollouts).rewards["hits"]}


def test_default_config_trains_an_environment_without_a_sim_reward(tmp_path):
    """The trainer's defaults name no reward: resampling judges flatness on every reward unless a recipe says."""
    toy = ToyConfig()
    config = GRPOConfig(output_dir=str(tmp_path / "run"), max_steps=1, prompts_per_step=2, num_generations=4,
                        micro_batch_size=8, max_completion_length=4, report_to="none")
    assert config.resample.ignore == []
    trainer = GRPOTrainer(build_toy_model(toy), ToyEnv(toy), HitsOnlyScorer(toy), toy_prompts(toy), config)
    (metrics,) = trainer.train()
    assert 0 <= metrics["rewards/hits/mean"] <= 1 and "rewards/sim/mean" not in metrics


def test_completion_table_takes_rows_with_or_without_audio():
    """A TTS environment's rows carry audio, a token environment's do not; both make a table, audio only for those
    that have it, captioned with the row's columns."""
    import numpy as np

    from vocalign.rlhf.metrics import completion_table

    tts = {"text": "one two", "reward/cer": 0.5, "audio": np.zeros(1600, dtype=np.float32), "sample_rate": 16000}
    tokens = {"completion": "t1 t2 t0", "reward/hits": 0.75}
    mixed = completion_table([tts, tokens])
    assert mixed["completions"].columns == ["text", "reward/cer", "completion", "reward/hits"]
    assert mixed["completions"].data == [["one two", 0.5, None, None], [None, None, "t1 t2 t0", 0.75]]
    (clip,) = mixed["completions/audio"]
    assert clip._caption == "text: one two | reward/cer: 0.5 | completion: None | reward/hits: None"
    without_audio = completion_table([tokens])
    assert set(without_audio) == {"completions"} and without_audio["completions"].data == [["t1 t2 t0", 0.75]]
    assert completion_table([]) == {}
