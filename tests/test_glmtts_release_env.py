"""GRPO on the tiny checkpoint with the release's other inference settings on: phoneme-in and the 32 kHz vocoder,
set in the recipe's ``env``, reach the rollouts (and so the held-out evaluation, which rolls out through the same
environment); `vocalign eval` takes them as flags."""

import json

import numpy as np
import pytest
import soundfile as sf

from vocalign.common.audio import write_audio
from vocalign.launch.cli import main
from vocalign.launch.recipe import load_recipe
from vocalign.policies import pipeline as pipeline_module
from vocalign.rlhf.trainer import GRPOTrainer

from .conftest import SHARED

G2P_TABLES = SHARED / "glmtts-data"  # the release's configs/ G2P files

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not G2P_TABLES.is_dir(), reason="shared/glmtts-data is not beside the checkout")]


def test_grpo_with_phoneme_in_and_the_32k_vocoder(tmp_path, monkeypatch):
    write_audio(tmp_path / "voice.wav", (0.1 * np.sin(np.arange(16000) / 7)).astype(np.float32), 16000)
    (tmp_path / "prompts.jsonl").write_text(
        '{"text": "他是老饕餮", "language": "zh", "prompt_wav": "voice.wav", "prompt_text": "你好"}\n'
        '{"text": "乡音无改鬓毛衰", "language": "zh", "prompt_wav": "voice.wav", "prompt_text": "你好"}\n')
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(json.dumps({
        "env": {"name": "glmtts", "ckpt": "tiny", "data": str(tmp_path / "prompts.jsonl"), "flow_steps": 2,
                "sample_rate": 32000, "phonemes": str(G2P_TABLES)},
        "rewards": [{"name": "energy"}],
        "trainer": {"output_dir": str(tmp_path / "run"), "max_steps": 1, "prompts_per_step": 2, "num_generations": 2,
                    "micro_batch_size": 4, "max_completion_length": 20, "learning_rate": 1e-4, "report_to": "none",
                    "reward_weights": {"energy": 1.0}, "resample": {"ignore": []}},
    }))
    run, config = load_recipe(recipe)
    trainer = GRPOTrainer(run.model, run.env, run.scorer, run.prompts, config)
    history = trainer.train()
    assert len(history) == 1 and all(np.isfinite(m["loss"]) for m in history)
    rollouts = trainer.last_rollouts
    assert {x["sample_rate"] for x in rollouts.extras} == {32000}  # Vocos2D: 640 samples a frame, 1280 a code
    codes = rollouts.completion_mask.sum(-1) - rollouts.stopped.long()  # the stop token makes no audio
    assert [len(x["audio"]) for x in rollouts.extras] == (codes * 1280).tolist()
    # the LM read phonemes where the release puts them: 饕餮 (rare) and 衰 (the replace dictionary) as phoneme tokens
    tokenizer = run.env.pipeline.lm.tokenizer
    phoneme_ids = {tokenizer.convert_tokens_to_ids(t) for t in ("<|T|>", "<|AO1|>", "<|C|>", "<|UEI1|>")}
    prompts_read = [set(ids[mask.bool()].tolist()) for ids, mask in zip(rollouts.prompt_ids, rollouts.prompt_mask)]
    assert all(len(read & phoneme_ids) == 2 for read in prompts_read)
    assert not any(tokenizer.convert_tokens_to_ids(ch) in read for read in prompts_read for ch in "饕餮衰")

    # the checkpoint the run trained, evaluated as it was trained: phoneme-in at 32 kHz
    (tmp_path / "list.txt").write_text("u1|你好|voice.wav|他是老饕餮\n")
    (tmp_path / "rewards.yaml").write_text("- name: energy\n")
    with_phonemes, lm_text = [], pipeline_module.lm_text
    monkeypatch.setattr(pipeline_module, "lm_text",
                        lambda text, phonemes: (with_phonemes.append(phonemes is not None), lm_text(text, phonemes))[1])
    assert main(["eval", "--ckpt", str(tmp_path / "run" / "tiny-ckpt"), "--list", str(tmp_path / "list.txt"),
                 "--out", str(tmp_path / "eval"), "--rewards", str(tmp_path / "rewards.yaml"), "--flow-steps", "2",
                 "--seed", "0", "--sample-rate", "32000", "--phonemes", str(G2P_TABLES)]) == 0
    assert sf.info(str(tmp_path / "eval" / "wavs" / "u1.wav")).samplerate == 32000
    assert with_phonemes == [True]  # the one chunk the LM read was converted
