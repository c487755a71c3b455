"""The full loop: GRPO on a GLM-TTS-layout checkpoint (tiny random, or the shipped demo TTS), rewards in process or from
real server processes on loopback."""

import json
import threading
import time

import pytest

from vocalign.launch.recipe import load_recipe
from vocalign.rewards.cer import cer_to_reward
from vocalign.rewards.text_norm import error_rate
from vocalign.rlhf.trainer import GRPOTrainer

from .conftest import REPO
from .test_reward_server import start_server

pytestmark = pytest.mark.slow


def test_grpo_with_reward_servers_survives_a_server_killed_mid_run(tmp_path, caplog):
    first, url_a = start_server()
    second, url_b = start_server()
    try:
        recipe = tmp_path / "recipe.yaml"
        recipe.write_text(json.dumps({
            "env": {"name": "glmtts", "ckpt": "tiny", "data": "demo", "flow_steps": 2},
            "rewards": [{"name": "energy", "urls": [url_a, url_b], "retries": 3, "backoff_s": 0.01,
                         "timeout_s": 30}],
            "trainer": {"output_dir": str(tmp_path / "run"), "max_steps": 4, "prompts_per_step": 2,
                        "num_generations": 2, "micro_batch_size": 4, "max_completion_length": 30,
                        "learning_rate": 1e-4, "report_to": "none", "save_steps": 2,
                        "reward_weights": {"energy": 1.0}, "resample": {"ignore": []}},
        }))
        run, config = load_recipe(recipe)
        trainer = GRPOTrainer(run.model, run.env, run.scorer, run.prompts, config)
        metrics_file = tmp_path / "run" / "metrics.jsonl"

        def kill_after_first_step():
            deadline = time.monotonic() + 300
            while time.monotonic() < deadline and not (metrics_file.is_file() and metrics_file.read_text()):
                time.sleep(0.05)
            first.kill()

        killer = threading.Thread(target=kill_after_first_step)
        killer.start()
        with caplog.at_level("WARNING", logger="vocalign.rewards.client"):
            history = trainer.train()
        killer.join()
        assert len(history) == 4 and all(m["rewards/energy/mean"] > 0 for m in history)
        assert history[-1]["reward_servers/energy/failed_attempts"] >= 1  # reported in the step's metrics
        assert any(url_a in r.getMessage() for r in caplog.records)  # and in the log, naming the server
        assert (tmp_path / "run" / "checkpoint-4" / "trainer_state.json").is_file()
        assert history[0]["time/token_to_audio_s"] > 0 and "time/rewards_s" in history[0]
    finally:
        for proc in (first, second):
            proc.kill()
            proc.wait()


def test_demo_recipe_in_process_rewards(tmp_path):
    run, config = load_recipe(REPO / "configs" / "grpo_demo_cpu.yaml",
                              [f"trainer.output_dir={tmp_path}", "trainer.max_steps=1", "trainer.report_to=none",
                               "trainer.prompts_per_step=4", "trainer.num_generations=4"])
    assert run.scorer.reward_names == ["cer", "sim"]
    trainer = GRPOTrainer(run.model, run.env, run.scorer, run.prompts, config)
    history = trainer.train()
    # the shipped demo TTS already speaks: a random policy's digits are all misheard (reward exp(-2.5) = 0.08 or less)
    assert len(history) == 1 and history[0]["rewards/cer/mean"] > 0.15
    # ... and each CER reward is GLM-TTS's exp(-2.5 * WER) of the transcript it was scored from
    run.scorer.score(trainer.last_rollouts)
    rows = run.scorer.sample_rows(trainer.last_rollouts, len(trainer.last_rollouts))
    assert rows and all(r["cer"] == pytest.approx(cer_to_reward(error_rate(r["text"], r["transcript"], "en")))
                        for r in rows)
    assert (tmp_path / "final" / "model.safetensors").is_file()


def test_wandb_offline_run_logs_audio_completions(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    run, config = load_recipe(REPO / "configs" / "grpo_demo_cpu.yaml",
                              [f"trainer.output_dir={tmp_path}", "trainer.max_steps=1", "trainer.report_to=wandb",
                               "trainer.prompts_per_step=2", "trainer.num_generations=2", "trainer.log_completions=2",
                               "trainer.max_completion_length=20"])
    trainer = GRPOTrainer(run.model, run.env, run.scorer, run.prompts, config)
    trainer.train()
    rows = run.scorer.sample_rows(trainer.last_rollouts, 2)
    assert len(rows) == 2 and {"audio", "text", "cer", "sim", "transcript"} <= set(rows[0])
    media = list((tmp_path / "wandb").rglob("*.wav"))
    assert len(media) == 2  # the two audio samples went into the offline run
