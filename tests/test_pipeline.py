"""End to end on the tiny checkpoint in the published layout: `vocalign synth`, offline and streaming."""

import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf
import torch

from vocalign.policies.checkpoints import write_tiny_checkpoint
from vocalign.policies.frontend.text import normalize_text, split_text
from vocalign.policies.mel import MEL_24K, log_mel
from vocalign.policies.pipeline import SynthesisSettings, TTSPipeline
from vocalign.rewards.audio import to_model_rate

from .conftest import REPO


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("ckpt"))


@pytest.fixture(scope="module")
def prompt_wav(tmp_path_factory):
    path = tmp_path_factory.mktemp("wav") / "prompt.wav"
    t = np.arange(int(2.0 * 22050)) / 22050
    sf.write(path, (0.2 * np.sin(2 * np.pi * 220 * t)).astype(np.float32), 22050)
    return path


def test_synth_cli_writes_a_24k_wav_of_the_token_length(prompt_wav, tmp_path):
    ckpt = tmp_path / "tiny"
    made = subprocess.run([sys.executable, "-m", "vocalign.launch.cli", "make-tiny-ckpt", str(ckpt)], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert made.returncode == 0, made.stderr[-2000:]
    assert {p.name for p in ckpt.iterdir()} == {"llm", "vq32k-phoneme-tokenizer", "speech_tokenizer", "flow", "hift",
                                                "frontend"}
    out = tmp_path / "out.wav"
    result = subprocess.run([sys.executable, "-m", "vocalign.launch.cli", "synth", "--ckpt", str(ckpt),
                             "--text", "今天天气很好。", "--prompt-wav", str(prompt_wav), "--prompt-text", "你好",
                             "--out", str(out), "--seed", "0", "--flow-steps", "2"],
                            cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    audio, rate = sf.read(out)
    assert rate == 24000
    # speech tokens at 25 Hz, 960 samples each; the LM emits between 2x and 20x the text's 7 tokens
    assert len(audio) % 960 == 0 and 14 * 960 <= len(audio) <= 140 * 960
    assert "synth" in result.stderr  # the progress bar


def test_streaming_matches_offline_length_and_emits_before_the_end(ckpt, prompt_wav):
    pipeline = TTSPipeline.from_pretrained(ckpt)
    audio, rate = sf.read(prompt_wav, dtype="float32")
    prompt = pipeline.prepare_prompt(audio, rate, "你好")
    # as released, every code and every mel frame of the prompt is kept (no trimming to two frames per code)
    assert prompt.codes == pipeline.codec.tokenize(audio, rate)
    assert len(prompt.condition.mel) == log_mel(torch.from_numpy(to_model_rate(audio, rate, 24000)), MEL_24K).shape[-1]
    settings = SynthesisSettings(flow_steps=2, max_new_tokens=120)
    text = "今天天气很好，我们去公园散步吧。"
    torch.manual_seed(3)
    offline = pipeline.synthesize(text, prompt, settings)
    torch.manual_seed(3)
    pieces = list(pipeline.stream(text, prompt, settings, blocks=(25, 50, 200), lookahead=(12, 25, 100)))
    assert len(pieces) >= 2 and sum(len(p) for p in pieces) == len(offline)
    assert len(pieces[0]) < len(offline)  # the first piece came before the whole utterance was done


def test_batched_codes_to_audio_handles_empty_and_mixed_lengths(ckpt, prompt_wav):
    pipeline = TTSPipeline.from_pretrained(ckpt)
    audio, rate = sf.read(prompt_wav, dtype="float32")
    prompt = pipeline.prepare_prompt(audio, rate, "你好")
    out = pipeline.codes_to_audio([[1, 2, 3], [], list(range(40))], [prompt] * 3, flow_steps=2)
    assert [len(a) for a in out] == [3 * 960, 0, 40 * 960]


def test_bad_prompt_audio_is_refused(ckpt):
    pipeline = TTSPipeline.from_pretrained(ckpt)
    with pytest.raises(ValueError, match="prompt audio contains NaN"):
        pipeline.prepare_prompt(np.full(24000, np.nan, np.float32), 24000, "x")


def test_long_text_chunks_carry_earlier_chunks_within_the_context_budget(ckpt, prompt_wav, monkeypatch):
    pipeline = TTSPipeline.from_pretrained(ckpt)
    audio, rate = sf.read(prompt_wav, dtype="float32")
    prompt = pipeline.prepare_prompt(audio, rate, "你好")
    seen = []
    encode = pipeline.lm.encode
    monkeypatch.setattr(pipeline.lm, "encode", lambda p: (seen.append(p), encode(p))[1])
    text = ("今天天气很好，我们一起去公园散步吧。公园里有很多花，红的、黄的、紫的，非常漂亮！"
            "小朋友们在草地上奔跑，老人们在树下下棋。这真是一个美好的周末。")
    torch.manual_seed(0)
    codes = list(pipeline.long_text_codes(text, prompt, SynthesisSettings(max_new_tokens=20)))
    assert len(codes) == len(seen) == 2
    voice_ids = pipeline.lm.text_ids("你好。 ")  # the prompt text normalised as released, then " "
    assert seen[0].prompt_codes == prompt.codes and seen[0].prompt_text_ids == voice_ids
    assert seen[1].prompt_codes == prompt.codes + codes[0]  # the first chunk's speech carried as context
    first = split_text(normalize_text(text))[0]  # and its ids as they were fed, not re-tokenised
    assert seen[1].prompt_text_ids == voice_ids + pipeline.lm.text_ids(pipeline.text_input(first))
    seen.clear()
    pipeline.max_context = 10  # too small for any history: chunks fall back to the voice prompt alone
    list(pipeline.long_text_codes(text, prompt, SynthesisSettings(max_new_tokens=20)))
    assert [p.prompt_codes for p in seen] == [prompt.codes, prompt.codes]
