"""`vocalign train` on bad input: one clear line and exit code 2, no traceback, before any work is lost."""

import json
import logging

import numpy as np
import pytest
import soundfile as sf

from vocalign.launch.cli import main


@pytest.fixture
def prompts(tmp_path):
    sf.write(tmp_path / "voice.wav", (0.1 * np.sin(np.arange(16000) / 5)).astype(np.float32), 16000)
    rows = [{"text": "one two", "language": "en", "prompt_wav": "voice.wav", "prompt_text": "three"}]
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def train(tmp_path, caplog, data, rewards):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(json.dumps({
        "env": {"name": "glmtts", "ckpt": "tiny", "data": str(data), "flow_steps": 1},
        "rewards": rewards,
        "trainer": {"output_dir": str(tmp_path / "run"), "max_steps": 1, "prompts_per_step": 1, "num_generations": 2,
                    "micro_batch_size": 2, "max_completion_length": 8, "report_to": "none",
                    "resample": {"ignore": []}}}))
    caplog.clear()
    with caplog.at_level(logging.ERROR, logger="vocalign"):
        code = main(["train", str(recipe)])
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert code == 2 and len(errors) == 1 and not errors[0].exc_info
    return errors[0].getMessage()


def test_typo_in_a_reward_setting_names_it(tmp_path, caplog, prompts):
    message = train(tmp_path, caplog, prompts, [{"name": "energy", "target_dbfz": -20}])
    assert "unknown key(s) in reward 'energy': 'target_dbfz' (did you mean 'target_dbfs'?)" in message


def test_empty_prompt_file(tmp_path, caplog):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert "holds no rows" in train(tmp_path, caplog, empty, [{"name": "energy"}])


def test_missing_or_non_audio_prompt_wav_is_named_at_load(tmp_path, caplog, prompts):
    (tmp_path / "voice.wav").write_text("not audio")
    assert "voice.wav cannot be read as audio" in train(tmp_path, caplog, prompts, [{"name": "energy"}])
    (tmp_path / "voice.wav").unlink()
    assert "voice.wav cannot be read as audio" in train(tmp_path, caplog, prompts, [{"name": "energy"}])


def test_reward_server_down(tmp_path, caplog, prompts):
    url = "http://127.0.0.1:9"  # the discard port: nothing listens there
    message = train(tmp_path, caplog, prompts, [{"name": "energy", "urls": [url], "retries": 1, "backoff_s": 0.01,
                                                 "timeout_s": 5}])
    assert url in message
