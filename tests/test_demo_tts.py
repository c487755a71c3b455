"""The demo TTS recipe: data splits that keep held-out texts and voices out of training, and a miniature build
that leaves a checkpoint the pipeline loads."""

import json

import numpy as np
import pytest

from vocalign.demo.build import (
    DemoTTSConfig,
    Utterance,
    build_demo_tts,
    load_demo_config,
    make_corpus,
    new_speech_lm,
    sft_examples,
)
from vocalign.policies.codec import MelUnitCodec
from vocalign.policies.mel_units import MelUnits
from vocalign.policies.pipeline import SynthesisSettings, TTSPipeline
from vocalign.policies.speech_lm import TTSPrompt
from vocalign.rlhf.tts_env import load_prompt_rows

from .conftest import REPO
from .speech import needs_espeak


def miniature(tmp_path, **sft) -> DemoTTSConfig:
    return load_demo_config(REPO / "configs" / "demo_tts.yaml", {
        "output_dir": str(tmp_path / "demo"), "speech.train_voices": ["en-us+m1", "en-us+f2"],
        "speech.heldout_voices": ["en-us+klatt2"], "data.sft_utterances_per_voice": 6, "data.rl_prompts": 4,
        "data.heldout_utterances": 3, "codec.num_codes": 16, "codec.griffin_lim_iters": 2,
        "model.hidden_size": 16, "model.intermediate_size": 32, "model.num_layers": 1, "model.num_heads": 2,
        "sft.steps": 3, "sft.batch_size": 4, "sft.warmup_steps": 1, **{f"sft.{k}": v for k, v in sft.items()}})


@needs_espeak
def test_held_out_texts_and_voices_never_reach_training(tmp_path):
    corpus = make_corpus(miniature(tmp_path))
    trained_texts = {u.text for u in corpus.sft} | set(corpus.rl_texts)
    heldout_texts = set(corpus.heldout_texts) | {u.text for u in corpus.heldout_prompts}
    assert not trained_texts & heldout_texts
    assert {u.voice for u in corpus.sft} == {"en-us+m1", "en-us+f2"}
    assert {u.voice for u in corpus.heldout_prompts} == {"en-us+klatt2"}
    assert len(corpus.sft) == 12 and len(corpus.rl_texts) == 4 and len(corpus.heldout_texts) == 3
    assert all(u.audio.dtype == np.float32 and 0.5 < len(u.audio) / 16000 < 6 for u in corpus.sft)


def test_bad_splits_are_refused(tmp_path):
    with pytest.raises(ValueError, match=r"voices \['en-us\+m1'\] are both trained on and held out"):
        load_demo_config(REPO / "configs" / "demo_tts.yaml", {"speech.heldout_voices": ["en-us+m1"]})
    config = load_demo_config(REPO / "configs" / "demo_tts.yaml",
                              {"text.words": ["zero", "one"], "text.min_words": 1, "text.max_words": 2})
    with pytest.raises(ValueError, match="distinct texts asked of only 6 possible"):
        make_corpus(config)
    with pytest.raises(ValueError, match=r"unknown key\(s\) in demo_tts.sft: 'step' \(did you mean 'steps'\?\)"):
        load_demo_config(REPO / "configs" / "demo_tts.yaml", {"sft.step": 3})


@needs_espeak
def test_miniature_build_leaves_a_checkpoint_the_pipeline_loads(tmp_path):
    out = build_demo_tts(miniature(tmp_path))
    provenance = json.loads((out / "provenance.json").read_text())
    assert provenance["data"]["sft_utterances"] == 12 and provenance["config"]["sft"]["steps"] == 3
    assert "espeak-ng" in provenance["espeak_ng"] and len(provenance["sft_loss"]["every_50"]) == 1
    # what makes the codebook differ between machines is recorded beside the figures it moves
    assert provenance["numerics"]["cpu"] and any("openblas" in pool for pool in provenance["numerics"]["blas"])
    pipeline = TTSPipeline.from_pretrained(out / "ckpt")
    assert pipeline.sample_rate == 16000 and pipeline.lm.vocab.num_codes == 16
    rows = load_prompt_rows(out / "prompts" / "heldout.jsonl")
    assert len(rows) == 3 and {r["voice"] for r in rows} == {"en-us+klatt2"}
    import soundfile as sf

    audio, rate = sf.read(rows[0]["prompt_wav"], dtype="float32")
    prompt = pipeline.prepare_prompt(audio, rate, rows[0]["prompt_text"])
    speech = pipeline.synthesize(rows[0]["text"], prompt, SynthesisSettings(max_new_tokens=20))
    assert speech.dtype == np.float32 and len(speech) % 640 == 0 and 0 < len(speech) <= 20 * 640
    with pytest.raises(ValueError, match="does not stream"):
        next(pipeline.stream(rows[0]["text"], prompt))


def test_sft_examples_feed_what_synthesis_feeds(tmp_path):
    """The SFT layout is the inference layout, texts normalised alike (GLM-TTS's front end adds a full stop): a model
    trained on raw texts would meet an unseen token in every GRPO and evaluation prompt."""
    cfg = miniature(tmp_path)
    lm = new_speech_lm(cfg)
    rate = cfg.codec.sample_rate
    noise = np.random.default_rng(0).normal(0, 0.1, 2 * rate).astype(np.float32)
    units = MelUnits.fit([noise], cfg.codec, seed=0)
    pipeline = TTSPipeline(lm, MelUnitCodec(units))
    prompt_utt = Utterance("en-us+m1", "one two three", noise, units.encode(noise))
    target_utt = Utterance("en-us+m1", "four five six", noise, [1, 2, 3])
    examples = sft_examples(lm, [target_utt, prompt_utt], prompts_per_utterance=1, seed=0)
    prompt = pipeline.prepare_prompt(noise, rate, prompt_utt.text)
    fed, _ = lm.encode(TTSPrompt(pipeline.text_input(target_utt.text), prompt.text, prompt.codes))
    ids, labels = examples[0]
    assert ids[:len(fed)] == fed and lm.tokenizer.decode(fed[:4]).endswith(".")
    assert labels[len(fed):] == ids[len(fed):] and set(labels[:len(fed)]) == {-100}
