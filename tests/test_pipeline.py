"""End to end on the tiny checkpoint in the published layout: `vocalign synth`, offline and streaming, at 24 kHz
(HiFT) and 32 kHz (Vocos2D), with and without phoneme-in."""

import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf
import torch

from vocalign.common.audio import to_model_rate
from vocalign.policies.checkpoints import write_tiny_checkpoint
from vocalign.policies.frontend.g2p import RELEASE_TABLES, PhonemeFrontend
from vocalign.policies.frontend.text import normalize_text, split_text
from vocalign.policies.mel import MEL_24K, MEL_32K, log_mel
from vocalign.policies.pipeline import SynthesisSettings, TTSPipeline

from .conftest import REPO, SHARED

G2P_TABLES = SHARED / "glmtts-data"  # the release's configs/ G2P files
needs_tables = pytest.mark.skipif(not G2P_TABLES.is_dir(), reason="shared/glmtts-data is not beside the checkout")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("ckpt"))


@pytest.fixture(scope="module")
def phoneme_ckpt(tmp_path_factory):
    """A tiny checkpoint whose tokenizer has the released phoneme tokens."""
    return write_tiny_checkpoint(tmp_path_factory.mktemp("phoneme_ckpt"), phonemes_file=G2P_TABLES / RELEASE_TABLES[0])


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
                                                "vocos2d", "frontend"}
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


def test_32k_decodes_with_vocos2d_from_a_32k_prompt_mel_offline_and_streaming(ckpt, prompt_wav):
    pipeline = TTSPipeline.from_pretrained(ckpt, sample_rate=32000)
    assert pipeline.sample_rate == 32000
    audio, rate = sf.read(prompt_wav, dtype="float32")
    prompt = pipeline.prepare_prompt(audio, rate, "你好")
    # the prompt's mel condition at 32 kHz settings (n_fft 2560, hop 640), as the release's 32 kHz front end
    torch.testing.assert_close(prompt.condition.mel,
                               log_mel(torch.from_numpy(to_model_rate(audio, rate, 32000)), MEL_32K).T)
    torch.manual_seed(0)
    out = pipeline.codes_to_audio([[1, 2, 3], [], list(range(40))], [prompt] * 3, flow_steps=2)
    assert [len(a) for a in out] == [3 * 1280, 0, 40 * 1280]  # two 640-sample frames per code
    pieces = list(pipeline.codec.stream(list(range(40)) * 2, prompt, 2, (25, 50, 200), (12, 25, 100), 0.1))
    # blocks of 25, 50 and 5 codes; the first piece holds back its 12-code look-ahead and the 0.1 s fade
    assert len(pieces) == 3 and len(pieces[0]) == 25 * 1280 - int(32000 * (12 / 25 + 0.1))
    assert sum(len(p) for p in pieces) == 80 * 1280


@needs_tables
def test_synth_cli_32k_streaming_with_phonemes(phoneme_ckpt, prompt_wav, tmp_path):
    out = tmp_path / "out.wav"
    result = subprocess.run([sys.executable, "-m", "vocalign.launch.cli", "synth", "--ckpt", str(phoneme_ckpt),
                             "--text", "他是老饕餮。", "--prompt-wav", str(prompt_wav), "--prompt-text", "你好",
                             "--out", str(out), "--seed", "0", "--flow-steps", "2", "--sample-rate", "32000",
                             "--stream", "--phonemes", str(G2P_TABLES)],
                            cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    audio, rate = sf.read(out)
    assert rate == 32000 and len(audio) % 1280 == 0 and len(audio) >= 2 * 1280


@needs_tables
def test_phoneme_in_reaches_the_lm_and_needs_a_tokenizer_with_phonemes(ckpt, phoneme_ckpt, prompt_wav, monkeypatch):
    phonemes = PhonemeFrontend.from_release_configs(G2P_TABLES)
    with pytest.raises(ValueError, match=r"phoneme-in: the speech LM's tokenizer has no token for 204 phonemes"):
        TTSPipeline.from_pretrained(ckpt, phonemes=phonemes)
    pipeline = TTSPipeline.from_pretrained(phoneme_ckpt, phonemes=phonemes)
    audio, rate = sf.read(prompt_wav, dtype="float32")
    prompt = pipeline.prepare_prompt(audio, rate, "你好")
    seen = []
    encode = pipeline.lm.encode
    monkeypatch.setattr(pipeline.lm, "encode", lambda p: (seen.append(p), encode(p))[1])
    pipeline.generate_codes(["他是老饕餮"], [prompt], sampling=SynthesisSettings(max_new_tokens=4))
    assert seen[0].text == "他是老<|T|><|AO1|><|T|><|IE4|>。"  # normalised, then the rare characters as phonemes
    assert pipeline.lm.text_ids(seen[0].text)[3:5] == [pipeline.lm.tokenizer.convert_tokens_to_ids(t)
                                                       for t in ("<|T|>", "<|AO1|>")]
    assert seen[0].prompt_text == "你好。"  # the voice prompt's text stays text, as released
