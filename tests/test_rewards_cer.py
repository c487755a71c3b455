"""CER reward: seed-tts-eval normalisation by hand, the formula, ASR backends on tiny models and on real speech."""

import json
import math
import os
import signal

import numpy as np
import pytest
import torch
import yaml

from vocalign.common.audio import to_model_rate
from vocalign.policies.mel_units import MelUnits
from vocalign.rewards.asr import ParaformerASR, WhisperASR
from vocalign.rewards.base import RewardResult, Sample
from vocalign.rewards.cer import CERReward, cer_to_reward
from vocalign.rewards.funasr_loader import build_funasr
from vocalign.rewards.pocketsphinx_asr import PocketSphinxASR
from vocalign.rewards.text_norm import error_rate, normalize

from .conftest import REPO
from .speech import needs_espeak, speak


@pytest.mark.parametrize("text, language, expected", [
    ("你好，世界！", "zh", list("你好世界")),
    ("“今天”天气很好。", "zh", list("今天天气很好")),
    ("It's 5 o'clock, OK?", "en", ["it's", "5", "o'clock", "ok"]),
    ("Hello -- World!!", "en", ["hello", "world"]),
    ("I have 2 cats", "en", ["i", "have", "2", "cats"]),  # numbers left alone
])
def test_normalisation_by_hand(text, language, expected):
    assert normalize(text, language) == expected


def test_traditional_hypothesis_becomes_simplified():
    assert normalize("說話", "zh", hypothesis=True) == ["说", "话"]
    assert error_rate("说话", "說話", "zh") == 0.0


def test_error_rates_by_hand():
    assert error_rate("你好世界", "你好世节", "zh") == pytest.approx(0.25)  # one substitution in four characters
    assert error_rate("the cat sat", "the cat", "en") == pytest.approx(1 / 3)
    assert error_rate("two cats", "2 cats", "en") == pytest.approx(0.5)  # no number normalisation
    assert error_rate("hello", "", "en") == 1.0


def test_reward_mapping():
    assert cer_to_reward(0.0) == 1.0
    assert cer_to_reward(0.4) == pytest.approx(math.exp(-1.0))
    assert cer_to_reward(0.4, "linear") == pytest.approx(0.6)
    with pytest.raises(ValueError, match="'exp' or 'linear'"):
        cer_to_reward(0.1, "log")


class TranscriberDouble:
    """Test double: returns fixed transcripts and records what it was given."""

    def __init__(self, texts):
        self.texts, self.seen = texts, []

    def transcribe(self, audios):
        self.seen.extend(audios)
        return self.texts[: len(audios)]


def test_cer_reward_formula_resampling_and_info():
    asr = TranscriberDouble(["the cat", "the cat sat"])
    reward = CERReward(transcribers={"en": asr})
    samples = [Sample(np.zeros(24000, np.float32) + 0.01, 24000, "the cat sat", "en")] * 2
    out = reward.score(samples)
    assert [r.info["transcript"] for r in out] == ["the cat", "the cat sat"]
    assert out[0].value == pytest.approx(math.exp(-2.5 / 3)) and out[1].value == 1.0
    assert len(asr.seen[0]) == 16000  # 1 s at 24 kHz arrives at 16 kHz
    with pytest.raises(ValueError, match="no ASR configured for language 'zh'"):
        reward.score([Sample(np.zeros(1600, np.float32), 16000, "你好", "zh")])
    with pytest.raises(ValueError, match="sample 0 contains NaN"):
        reward.score([Sample(np.full(1600, np.nan, np.float32), 16000, "x", "en")])


def tiny_whisper_folder(path):
    from transformers import WhisperConfig, WhisperFeatureExtractor, WhisperForConditionalGeneration, WhisperProcessor, WhisperTokenizer

    vocab = {c: i for i, c in enumerate("abcdefghijklmnopqrstuvwxyzĠ")}
    specials = ["<|endoftext|>", "<|startoftranscript|>"]
    for s in specials:
        vocab[s] = len(vocab)
    (path / "vocab.json").write_text(json.dumps(vocab))
    (path / "merges.txt").write_text("#version: 0.2\n")
    tok = WhisperTokenizer(str(path / "vocab.json"), str(path / "merges.txt"), unk_token="<|endoftext|>",
                           bos_token="<|endoftext|>", eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                           additional_special_tokens=["<|startoftranscript|>"])
    config = WhisperConfig(vocab_size=len(vocab), d_model=16, encoder_layers=1, decoder_layers=1,
                           encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32,
                           decoder_ffn_dim=32, max_target_positions=64, decoder_start_token_id=vocab["<|startoftranscript|>"],
                           eos_token_id=vocab["<|endoftext|>"], pad_token_id=vocab["<|endoftext|>"],
                           bos_token_id=vocab["<|endoftext|>"])
    torch.manual_seed(0)
    WhisperForConditionalGeneration(config).save_pretrained(path)
    WhisperProcessor(feature_extractor=WhisperFeatureExtractor(), tokenizer=tok).save_pretrained(path)


def test_whisper_backend_loads_the_hf_folder_layout(tmp_path):
    tiny_whisper_folder(tmp_path)
    asr = WhisperASR(tmp_path, max_new_tokens=6)
    texts = asr.transcribe([np.random.default_rng(0).normal(0, 0.1, 16000).astype(np.float32),
                            np.zeros(8000, np.float32)])
    assert len(texts) == 2 and all(isinstance(t, str) and set(t) <= set("abcdefghijklmnopqrstuvwxyz ") for t in texts)
    out = CERReward(transcribers={"en": asr}).score([Sample(np.zeros(16000, np.float32), 16000, "hello", "en")])
    # the reward is exp(-2.5 * CER) of what this backend transcribes for the same audio
    transcript = asr.transcribe([np.zeros(16000, np.float32)])[0]
    assert out[0].info["transcript"] == transcript
    assert out[0].value == pytest.approx(math.exp(-2.5 * error_rate("hello", transcript, "en")))


TOKENS = ["<blank>", "<s>", "</s>", "<unk>"] + list("你好世界今天气很")


def tiny_paraformer_config():
    return dict(
        model="Paraformer",
        model_conf=dict(ctc_weight=0.0, lsm_weight=0.1, predictor_weight=1.0, predictor_bias=1, sampling_ratio=0.75),
        encoder="SANMEncoder",
        encoder_conf=dict(output_size=32, attention_heads=2, linear_units=64, num_blocks=2, dropout_rate=0.0,
                          positional_dropout_rate=0.0, attention_dropout_rate=0.0, input_layer="pe",
                          pos_enc_class="SinusoidalPositionEncoder", normalize_before=True, kernel_size=11,
                          sanm_shfit=0, selfattention_layer_type="sanm"),
        decoder="ParaformerSANMDecoder",
        decoder_conf=dict(attention_heads=2, linear_units=64, num_blocks=2, dropout_rate=0.0,
                          positional_dropout_rate=0.0, self_attention_dropout_rate=0.0,
                          src_attention_dropout_rate=0.0, att_layer_num=2, kernel_size=11, sanm_shfit=0),
        predictor="CifPredictorV2",
        predictor_conf=dict(idim=32, threshold=1.0, l_order=1, r_order=1, tail_threshold=0.45),
        frontend="WavFrontend",
        frontend_conf=dict(fs=16000, window="hamming", n_mels=80, frame_length=25, frame_shift=10, lfr_m=7, lfr_n=6),
        tokenizer="CharTokenizer",
        tokenizer_conf=dict(token_list="tokens.json", unk_symbol="<unk>"),
    )


def write_paraformer_folder(path):
    config = tiny_paraformer_config()
    (path / "config.yaml").write_text(yaml.safe_dump(config, allow_unicode=True))
    (path / "tokens.json").write_text(json.dumps(TOKENS, ensure_ascii=False))
    built = build_funasr({**config, "tokenizer_conf": {**config["tokenizer_conf"], "token_list": TOKENS}})
    torch.save(built.model.state_dict(), path / "model.pt")
    return built


def test_paraformer_loads_the_published_folder_and_transcribes(tmp_path):
    built = write_paraformer_folder(tmp_path)
    asr = ParaformerASR(tmp_path)
    for key, value in built.model.state_dict().items():
        torch.testing.assert_close(asr.auto.model.state_dict()[key], value)
    texts = asr.transcribe([np.random.default_rng(1).normal(0, 0.1, 16000).astype(np.float32)])
    assert len(texts) == 1 and set(texts[0]) <= set("".join(TOKENS[4:]))


def test_paraformer_mismatched_checkpoint_names_file_and_key(tmp_path):
    write_paraformer_folder(tmp_path)
    state = torch.load(tmp_path / "model.pt", weights_only=True)
    state.pop("decoder.embed.0.weight")
    torch.save(state, tmp_path / "model.pt")
    with pytest.raises(ValueError, match=r"model\.pt does not match.*missing keys \['decoder\.embed\.0\.weight'\]"):
        ParaformerASR(tmp_path)
    (tmp_path / "tokens.json").unlink()
    with pytest.raises(FileNotFoundError, match="token_list names tokens.json"):
        ParaformerASR(tmp_path)


@needs_espeak
def test_pocketsphinx_cer_prefers_the_matching_text_on_real_speech():
    text = "the quick brown fox jumps over the lazy dog"
    audio, rate = speak(text)
    reward = CERReward(transcribers={"en": PocketSphinxASR()})
    right, wrong = reward.score([Sample(audio, rate, text, "en"),
                                 Sample(audio, rate, "please call stella and ask her to bring these things", "en")])
    assert right.value > wrong.value, (right.info, wrong.info)
    assert isinstance(right, RewardResult) and right.info["transcript"]


DIGITS = "zero one two three four five six seven eight nine".split()


@needs_espeak
def test_pocketsphinx_restricted_to_a_vocabulary_is_a_sharp_judge_of_digit_strings():
    rng = np.random.default_rng(0)
    texts = [" ".join(rng.choice(DIGITS, 4)) for _ in range(8)]
    audios = [to_model_rate(*speak(t, "en-us+klatt", 150)) for t in texts]
    restricted = PocketSphinxASR(vocabulary=DIGITS).transcribe(audios)
    general = PocketSphinxASR().transcribe(audios)
    wer_restricted = np.mean([error_rate(t, h, "en") for t, h in zip(texts, restricted)])
    wer_general = np.mean([error_rate(t, h, "en") for t, h in zip(texts, general)])
    assert all(set(h.split()) <= set(DIGITS) for h in restricted)
    assert wer_restricted < 0.2 and wer_general > wer_restricted + 0.3, (wer_restricted, wer_general)


@needs_espeak
def test_a_pocketsphinx_transcript_depends_on_its_audio_only_not_on_what_was_decoded_before():
    # Griffin-Lim speech (the demo's codec), where a decoder that carried state across utterances transcribed
    # 3 of these 40 clips differently in reverse order
    units = MelUnits.load(REPO / "demo" / "ckpt" / "mel_units")
    rng = np.random.default_rng(0)
    voices = ["en-us+klatt", "en-us+f4", "en-us+m5", "en-us+david"]
    texts = [" ".join(rng.choice(DIGITS, 4)) for _ in range(40)]
    audios = [units.decode(units.encode(to_model_rate(*speak(t, voices[i % 4], 150)))) for i, t in enumerate(texts)]
    asr = PocketSphinxASR(vocabulary=DIGITS, decoder_options={"beam": 1e-30, "wbeam": 1e-20})
    forward = asr.transcribe(audios)
    assert asr.transcribe(audios[::-1])[::-1] == forward


@needs_espeak
def test_pocketsphinx_workers_give_the_same_transcripts_and_survive_a_killed_worker(caplog):
    rng = np.random.default_rng(1)
    texts = [" ".join(rng.choice(DIGITS, 3)) for _ in range(6)]
    audios = [to_model_rate(*speak(t, "en-us+klatt", 150)) for t in texts]
    in_process = PocketSphinxASR(vocabulary=DIGITS).transcribe(audios)
    pooled = PocketSphinxASR(vocabulary=DIGITS, workers=2)
    assert pooled.transcribe(audios) == in_process
    for pid in list(pooled._pool._processes):  # what the kernel's OOM killer would do
        os.kill(pid, signal.SIGKILL)
    assert pooled.transcribe(audios) == in_process  # started afresh, nothing lost
    assert "worker process died" in caplog.text


@needs_espeak
def test_pocketsphinx_reads_a_jsgf_grammar_file(tmp_path):
    grammar = tmp_path / "commands.gram"
    grammar.write_text("#JSGF V1.0;\ngrammar commands;\npublic <command> = turn left | turn right | stop now ;\n")
    asr = PocketSphinxASR(jsgf=grammar)
    said = ["turn right", "turn left"]
    assert asr.transcribe([to_model_rate(*speak(w, "en-us+klatt", 130)) for w in said]) == said


def test_pocketsphinx_grammar_settings_are_checked(tmp_path):
    with pytest.raises(ValueError, match=r"dictionary has no \['qzxv'\]"):
        PocketSphinxASR(vocabulary=["zero", "qzxv"])
    with pytest.raises(ValueError, match="not both"):
        PocketSphinxASR(vocabulary=["zero"], jsgf=tmp_path / "digits.gram")
    with pytest.raises(FileNotFoundError, match="digits.gram does not exist"):
        PocketSphinxASR(jsgf=tmp_path / "digits.gram")
    with pytest.raises(ValueError, match="rejected decoder_options.*beem"):
        PocketSphinxASR(vocabulary=["zero"], decoder_options={"beem": 1e-30})
    with pytest.raises(ValueError, match="cannot set samprate"):
        PocketSphinxASR(decoder_options={"samprate": 8000})
    with pytest.raises(ValueError, match="workers must be a whole number >= 1"):
        PocketSphinxASR(workers=0)
