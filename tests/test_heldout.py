"""Held-out evaluation: per-seed means, spread and relative change by hand, on a test-double environment; the
same figures from one process or two sharing the rows; the evaluation during training."""

import json
import logging
import os
import socket

import matplotlib.pyplot as plt
import numpy as np
import pytest
import soundfile as sf
import torch
import torch.multiprocessing as mp
from accelerate import PartialState

from vocalign.eval.heldout import HeldoutEvaluation, HeldoutSettings, PolicyScores, compare, format_table, score_policy
from vocalign.eval.plots import curve_panels, plot_reward_curves
from vocalign.rewards.base import RewardResult
from vocalign.rewards.cer import CERReward
from vocalign.rlhf.config import GRPOConfig
from vocalign.rlhf.rollout import Rollouts
from vocalign.rlhf.toy_env import ToyConfig, ToyEnv, ToyScorer, build_toy_model, toy_prompts
from vocalign.rlhf.trainer import GRPOTrainer


class NoisyEnv:
    """Test double: audio whose length in samples is 100 * the text's characters plus a torch-random jitter drawn
    row after row (so a row's length depends on the batch it is sampled in, as with batched sampling)."""

    def __init__(self):
        self.calls, self.synced, self.model_training = 0, [], []

    def rollout(self, model, prompts, num_generations, sampling):
        self.calls += 1
        self.synced.append(sampling.synced_processes)
        self.model_training.append(model.training)
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
    roles = {"error_rate": "cer"}

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


class SpeechEnv:
    """Test double: half a second of 16 kHz audio per row, as a TTS environment's extras describe it."""

    def rollout(self, model, prompts, num_generations, sampling):
        extras = [{"audio": np.full(8000, 0.1, np.float32), "sample_rate": 16000, "text": row["text"],
                   "language": "en"} for row in prompts for _ in range(num_generations)]
        empty = torch.zeros(len(extras), 1, dtype=torch.long)
        return Rollouts(empty, empty, empty, empty, empty.float(), num_generations, extras)


class FakeTranscriber:
    """Test double for a recogniser: hears every utterance as the same four words."""

    def transcribe(self, audios):
        return ["one two three five"] * len(audios)


class FakeSpeakerSimilarity:
    """Test double for a speaker-similarity plugin under another name: reward (1 + cos) / 2 of a cosine of 0.2."""

    name = "voice_match"
    roles = {"similarity": "cosine"}

    def score(self, samples):
        return [RewardResult(0.6, {"cosine": 0.2}) for _ in samples]


def test_error_rate_is_the_recognisers_error_rate_whatever_the_plugin_is_called():
    asr = CERReward(transcribers={"en": FakeTranscriber()})  # the real plugin: reward exp(-2.5 * CER)
    asr.name = "asr"
    rows = [{"text": "one two three four"}, {"text": "one two three five"}]  # WER 1/4 and 0
    scores = score_policy(SpeechEnv(), torch.nn.Linear(1, 1), rows, [asr, FakeSpeakerSimilarity()],
                          HeldoutSettings(seeds=[0], batch_size=2, save_wavs=0))
    assert [r["error_rate"] for r in scores.rows] == [0.25, 0.0]  # the recogniser's error rate, not the reward's
    assert [r["reward/asr"] for r in scores.rows] == pytest.approx([np.exp(-2.5 * 0.25), 1.0])
    assert [r["transcript"] for r in scores.rows] == ["one two three five"] * 2
    assert [r["sim"] for r in scores.rows] == [0.2, 0.2]  # the cosine, not the reward 0.6
    table = format_table({"sft": scores.summary()}, ["sft"])
    assert "| sft | 0.1250 [0.1250] | 0.2000 [0.2000] |" in table


def test_two_plugins_in_one_role_are_refused_before_evaluating(tmp_path):
    other = FakeSpeakerSimilarity()
    other.name = "voice_match_2"
    with pytest.raises(ValueError, match="'voice_match' and 'voice_match_2' both declare the role 'similarity'"):
        HeldoutEvaluation(SpeechEnv(), [FakeSpeakerSimilarity(), other], ROWS, HeldoutSettings(), tmp_path)


def test_settings_are_checked():
    with pytest.raises(ValueError, match="at least one seed"):
        HeldoutSettings(seeds=[])


SHARED_ROWS = [{"text": "x" * (n + 1)} for n in range(7)]  # 4 batches of 2: process 0 takes 0 and 2, process 1 1 and 3
SHARED_SETTINGS = HeldoutSettings(seeds=[3, 5], batch_size=2, save_wavs=3)
ONE_BATCH = HeldoutSettings(seeds=[0, 1], batch_size=8)  # ROWS make one batch: process 1 has none


def _score(processes=None, synced=False, rows=SHARED_ROWS, settings=SHARED_SETTINGS):
    env = NoisyEnv()
    scores = score_policy(env, torch.nn.Linear(1, 1), rows, [LengthCER()], settings, processes, synced)
    return {"rows": scores.rows, "per_seed": {str(k): v for k, v in scores.per_seed.items()},
            "audio": [len(a) for a, _ in scores.audio], "table": format_table({"p": scores.summary()}, ["p"]),
            "rollouts": env.calls, "synced": env.synced}


def _score_as_one_of_two(rank, port, out_dir):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    state = PartialState(cpu=True)
    result = {"plain": _score(state), "synced": _score(state, synced=True),
              "one_batch": _score(state, synced=True, rows=ROWS, settings=ONE_BATCH)}
    with open(f"{out_dir}/rank{rank}.json", "w") as f:
        json.dump(result, f)
    torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_two_processes_sharing_the_rows_give_the_single_process_figures(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_score_as_one_of_two, args=(port, str(tmp_path)), nprocs=2, join=True)
    alone = json.loads(json.dumps(_score()))  # through JSON as the processes' results were
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for rank in ranks:
        for mode in ("plain", "synced"):
            got = rank[mode]
            assert got["rows"] == alone["rows"] and got["per_seed"] == alone["per_seed"]
            assert got["table"] == alone["table"] and got["audio"] == alone["audio"]
    # the wavs kept are the first seed's first three rows
    assert alone["audio"] == [round(1000 * row["seconds"]) for row in alone["rows"][:3]]
    assert [r["index"] for r in alone["rows"]] == list(range(7)) * 2 and alone["rollouts"] == 8
    # each process sampled only its own batches (2 per seed); under ZeRO-3 the one with fewer real batches keeps
    # step: 4 batches split evenly, so both sample 2 per seed, and the sampler is told to keep step too
    assert [r["plain"]["rollouts"] for r in ranks] == [4, 4] and not any(ranks[0]["plain"]["synced"])
    assert all(all(r["synced"]["synced"]) for r in ranks)
    # with one batch for two processes, the second samples once per seed to keep step and keeps nothing of it
    one_batch = _score(rows=ROWS, settings=ONE_BATCH)
    assert [r["one_batch"]["rollouts"] for r in ranks] == [2, 2]
    assert all(r["one_batch"]["rows"] == one_batch["rows"] for r in ranks)


class ProbeEnv(NoisyEnv):
    """Test double: NoisyEnv that also keeps the model it was given."""

    def rollout(self, model, prompts, num_generations, sampling):
        self.model = model
        return super().rollout(model, prompts, num_generations, sampling)


def toy_trainer(tmp_path, callbacks, **overrides):
    toy = ToyConfig()
    settings = dict(output_dir=str(tmp_path), max_steps=5, prompts_per_step=2, num_generations=4, micro_batch_size=8,
                    learning_rate=3e-3, max_completion_length=8, report_to="none",
                    reward_weights={"hits": 1.0, "sim": 0.1}, save_steps=1000)
    config = GRPOConfig(**{**settings, **overrides})
    return GRPOTrainer(build_toy_model(toy), ToyEnv(toy), ToyScorer(toy), toy_prompts(toy), config,
                       step_callbacks=callbacks)


def test_evaluation_during_training_every_n_steps_leaves_the_run_unchanged(tmp_path):
    env = ProbeEnv()
    evaluation = HeldoutEvaluation(env, [LengthCER()], ROWS, HeldoutSettings(seeds=[0, 1], every_steps=2), tmp_path)

    def training_mode(trainer, steps_done):
        return {"probe/training": float(trainer.accelerator.unwrap_model(trainer.model).training)}

    trainer = toy_trainer(tmp_path / "with", [evaluation.during_training, training_mode])
    history = trainer.train()
    plain = toy_trainer(tmp_path / "without", []).train()
    assert [sorted(k for k in m if k.startswith("eval/")) for m in history] == [
        [], ["eval/error_rate", "eval/error_rate/seed_spread", "eval/reward/cer", "eval/reward/cer/seed_spread",
             "eval/seconds_per_char_median", "eval/seconds_per_char_median/seed_spread"], [], ["eval/error_rate",
             "eval/error_rate/seed_spread", "eval/reward/cer", "eval/reward/cer/seed_spread",
             "eval/seconds_per_char_median", "eval/seconds_per_char_median/seed_spread"], []]
    alone = score_policy(NoisyEnv(), torch.nn.Linear(1, 1), ROWS, [LengthCER()], evaluation.settings).summary()
    assert history[1]["eval/error_rate"] == alone["error_rate"] and history[3]["time/eval_s"] > 0
    # the policy being trained was scored in eval mode, then trained on in train mode
    assert env.model is trainer.accelerator.unwrap_model(trainer.model)
    assert env.model_training == [False] * 4 and all(m["probe/training"] == 1.0 for m in history)
    # the evaluation leaves the run's random stream alone: the same rewards as a run without it
    assert [m["reward/mean"] for m in history] == [m["reward/mean"] for m in plain]
    rows = [json.loads(line) for line in trainer.metrics_path.read_text().splitlines()]
    assert [r["step"] for r in rows if "eval/error_rate" in r] == [1, 3]


def test_an_evaluation_on_a_step_that_is_not_logged_is_reported(tmp_path, caplog):
    evaluation = HeldoutEvaluation(NoisyEnv(), [LengthCER()], ROWS, HeldoutSettings(seeds=[0], every_steps=3), tmp_path)
    trainer = toy_trainer(tmp_path, [evaluation.during_training], max_steps=6, logging_steps=4)
    with caplog.at_level(logging.WARNING, logger="vocalign.eval.heldout"):
        trainer.train()
    # the rows of steps 0, 4 and 5 (every fourth, and the last) are logged: the evaluation after 3 steps is lost,
    # the one after 6 is in the last row
    assert "after step 3 are not written" in caplog.text and "after step 6" not in caplog.text
    rows = [json.loads(line) for line in trainer.metrics_path.read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 4, 5] and [r["step"] for r in rows if "eval/error_rate" in r] == [5]


def test_every_steps_is_checked():
    with pytest.raises(ValueError, match="eval.every_steps must be >= 0"):
        HeldoutSettings(every_steps=-1)


def test_reward_curves_get_the_held_out_curve_against_steps_done(tmp_path):
    rows = [{"step": s, "reward/mean": 0.1 * s, "rewards/cer/mean": 0.2 * s} for s in range(4)]
    rows[1].update({"eval/error_rate": 0.5, "eval/sim": 0.6})
    rows[3].update({"eval/error_rate": 0.4, "eval/sim": 0.7})
    panels = curve_panels({"run": rows})
    assert list(panels) == ["reward", "cer", "held-out error_rate", "held-out sim"]
    assert panels["held-out error_rate"]["run"] == [(2, 0.5), (4, 0.4)]  # the policies after 2 and 4 steps
    assert panels["cer"]["run"] == [(s, 0.2 * s) for s in range(4)]
    without = [{k: v for k, v in row.items() if not k.startswith("eval/")} for row in rows]
    assert list(curve_panels({"run": without})) == ["reward", "cer"]
    # the evaluations before and after training join the curve; given for a step the metrics have, they win
    ends = {"run": {0: {"error_rate": 0.6, "sim": 0.5}, 4: {"error_rate": 0.3, "sim": 0.8}}}
    assert curve_panels({"run": rows}, ends)["held-out error_rate"]["run"] == [(0, 0.6), (2, 0.5), (4, 0.3)]
    assert curve_panels({"run": without}, ends)["held-out sim"]["run"] == [(0, 0.5), (4, 0.8)]
    png = plot_reward_curves({"run": rows}, tmp_path / "curves.png")
    assert plt.imread(png).shape[1] == 4 * 400  # four panels of 4 inches at 100 dpi
