"""SIM, emotion and laughter rewards: tiny random models of the real classes, formulas, and real speech."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from transformers import Wav2Vec2FeatureExtractor

from vocalign.common.audio import to_model_rate
from vocalign.rewards.base import RewardResult, Sample
from vocalign.rewards.emotion import AudioClassifierEmotion, EmotionReward
from vocalign.rewards.laughter import AudioClassifierLaughterDetector, LaughterReward, asks_for_laughter, transcribes_laughter
from vocalign.rewards.similarity import ResemblyzerEncoder, SpeakerSimilarityReward, XVectorEncoder, cosine

from .speech import needs_espeak, speak

EMOTIONS = ["生气/angry", "厌恶/disgusted", "恐惧/fearful", "开心/happy", "中立/neutral", "其他/other", "难过/sad",
            "吃惊/surprised", "<unk>"]


def noise(seconds=1.0, seed=0, rate=16000):
    return np.random.default_rng(seed).normal(0, 0.1, int(seconds * rate)).astype(np.float32)


def tiny_extractor():
    return Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=16000, padding_value=0.0, do_normalize=True,
                                    return_attention_mask=True)


def tiny_wavlm_kwargs():
    return dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                conv_dim=(16, 16), conv_stride=(5, 4), conv_kernel=(10, 8), num_conv_pos_embeddings=16,
                num_conv_pos_embedding_groups=2, num_buckets=8, max_bucket_distance=16)


def test_xvector_similarity_range_and_identity():
    from transformers import WavLMConfig, WavLMForXVector

    torch.manual_seed(0)
    model = WavLMForXVector(WavLMConfig(**tiny_wavlm_kwargs(), tdnn_dim=(16, 16), tdnn_kernel=(3, 1),
                                        tdnn_dilation=(1, 1), xvector_output_dim=8))
    reward = SpeakerSimilarityReward(speaker_encoder=XVectorEncoder(parts=(model, tiny_extractor())))
    a, b = noise(seed=1), noise(seed=2, seconds=1.5)
    out = reward.score([Sample(a, 16000, "x", "en", a, 16000), Sample(a, 16000, "x", "en", b, 16000)])
    assert out[0].value == pytest.approx(1.0, abs=1e-5)  # same audio: cosine 1 -> reward 1
    assert out[1].value < out[0].value  # another recording is less similar than the audio itself
    assert out[1].value == pytest.approx((1 + out[1].info["cosine"]) / 2)
    with pytest.raises(ValueError, match="sample 0 has no prompt audio"):
        reward.score([Sample(a, 16000, "x", "en")])


def test_cosine_by_hand():
    assert cosine(np.array([[1.0, 0.0]]), np.array([[0.0, 2.0]]))[0] == pytest.approx(0.0)
    assert cosine(np.array([[1.0, 1.0]]), np.array([[-3.0, -3.0]]))[0] == pytest.approx(-1.0)


@needs_espeak
def test_batched_resemblyzer_embeddings_equal_resemblyzers_own():
    from resemblyzer import preprocess_wav

    clips = [to_model_rate(*speak(text, voice)) for text, voice in
             (("one two three", "en-us"), ("the weather is lovely today and we will walk to the park", "en-us+f3"))]
    encoder = ResemblyzerEncoder()
    own = np.stack([encoder.encoder.embed_utterance(preprocess_wav(c, source_sr=16000)) for c in clips])
    np.testing.assert_allclose(encoder.embed(clips), own, atol=1e-5)


@needs_espeak
def test_resemblyzer_same_voice_scores_higher_than_male_vs_female():
    male_a, rate = speak("the weather is lovely today and we will walk to the park", "en-us")
    male_b, _ = speak("please remember to bring the blue umbrella with you", "en-us")
    female, _ = speak("please remember to bring the blue umbrella with you", "en-us+f3")
    reward = SpeakerSimilarityReward(speaker_encoder=ResemblyzerEncoder())
    same, different = reward.score([Sample(male_b, rate, "", "en", male_a, rate),
                                    Sample(female, rate, "", "en", male_a, rate)])
    assert same.value > different.value, (same.info, different.info)


def tiny_audio_classifier(labels):
    from transformers import WavLMConfig, WavLMForSequenceClassification

    torch.manual_seed(0)
    config = WavLMConfig(**tiny_wavlm_kwargs(), num_labels=len(labels), classifier_proj_size=8,
                         id2label=dict(enumerate(labels)), label2id={lb: i for i, lb in enumerate(labels)})
    return WavLMForSequenceClassification(config)


def test_emotion_reward_is_probability_of_target_or_not_neutral():
    classifier = AudioClassifierEmotion(parts=(tiny_audio_classifier(EMOTIONS), tiny_extractor()))
    reward = EmotionReward(emotion_classifier=classifier)
    audio = noise()
    probs = classifier.probabilities([audio])[0]
    assert probs.sum() == pytest.approx(1.0) and len(probs) == 9
    happy, unspecified = reward.score([Sample(audio, 16000, "x", "en", emotion="happy"),
                                       Sample(audio, 16000, "x", "en")])
    assert happy.value == pytest.approx(probs[3])
    assert unspecified.value == pytest.approx(1 - probs[4])  # neutral is index 4
    with pytest.raises(ValueError, match="emotion 'bored' is not a label"):
        reward.score([Sample(audio, 16000, "x", "en", emotion="bored")])


def test_emotion_without_a_neutral_label_scores_only_targeted_samples():
    labels = ["angry", "happy", "sad"]
    classifier = AudioClassifierEmotion(parts=(tiny_audio_classifier(labels), tiny_extractor()))
    reward = EmotionReward(emotion_classifier=classifier)
    audio = noise()
    (sad,) = reward.score([Sample(audio, 16000, "x", "en", emotion="sad")])
    assert sad.value == pytest.approx(classifier.probabilities([audio])[0][2])
    with pytest.raises(ValueError, match="sample 0 names no emotion and the classifier has no 'neutral' label"):
        reward.score([Sample(audio, 16000, "x", "en")])


@pytest.mark.parametrize("text, expected", [
    ("ha ha, that is funny", True), ("Hahaha!", True), ("hey hey", True), ("哈哈，太好了", True), ("呵呵", True),
    ("ha, that is funny", False), ("he said hello", False), ("哈", False), ("hello there", False),
])
def test_laughter_text_rule(text, expected):
    assert asks_for_laughter(text) is expected


class DetectorDouble:
    """Test double: reports a laughter segment or none, as told."""

    def __init__(self, found):
        self.found = found

    def segments(self, audio):
        return [(0.2, 0.8)] if self.found else []


@pytest.mark.parametrize("text, found, transcript, expected", [
    ("ha ha ha, sure", True, "sure", 1.0),  # laughed, ASR dropped it: a real laugh
    ("ha ha ha, sure", True, "ha ha ha sure", 0.0),  # ASR read the words: read out, not laughed
    ("ha ha ha, sure", False, "sure", 0.0),  # no laugh detected
    ("sure", True, "sure", 0.0),  # text asks for no laughter
])
def test_laughter_reward_rule(text, found, transcript, expected):
    reward = LaughterReward(laughter_detector=DetectorDouble(found))
    out = reward.score([Sample(noise(), 16000, text, "en")], upstream={"cer": [RewardResult(1.0, {"transcript": transcript})]})
    assert out[0].value == expected


def test_laughter_needs_the_cer_transcript():
    reward = LaughterReward(laughter_detector=DetectorDouble(True))
    with pytest.raises(ValueError, match="cer reward's transcripts"):
        reward.score([Sample(noise(), 16000, "ha ha", "en")])
    with pytest.raises(ValueError, match="sample 0: the cer result carries no transcript"):
        reward.score([Sample(noise(), 16000, "ha ha", "en")], upstream={"cer": [RewardResult(1.0, {})]})
    assert transcribes_laughter("哈哈 好") and not transcribes_laughter("he is here")


def test_audio_classifier_laughter_detector_windows_and_merges():
    labels = ["Speech", "Laughter", "Music"]
    model = tiny_audio_classifier(labels)
    detector = AudioClassifierLaughterDetector(parts=(model, tiny_extractor()), label="Laughter", threshold=0.0)
    segments = detector.segments(noise(seconds=2.5))
    assert segments == [(0.0, 2.5)]  # threshold 0: every window counts, merged into one segment
    strict = AudioClassifierLaughterDetector(parts=(model, tiny_extractor()), label="Laughter", threshold=1.01)
    assert strict.segments(noise(seconds=2.5)) == []
    with pytest.raises(ValueError, match="no 'Giggle' class"):
        AudioClassifierLaughterDetector(parts=(model, tiny_extractor()), label="Giggle")


class LevelLaughterClassifier(torch.nn.Module):
    """Test double for an audio classifier: P(Laughter) of a window is its mean sample value, so audio made of
    constant blocks sets each window's probability by hand."""

    def __init__(self):
        super().__init__()
        self.config = SimpleNamespace(id2label={0: "Speech", 1: "Laughter"})

    def forward(self, input_values, **kwargs):
        p = input_values.mean(-1)
        return SimpleNamespace(logits=torch.stack([torch.log1p(-p), torch.log(p)], -1))


def level_blocks(levels, block_s=0.5, rate=16000):
    return np.repeat(np.asarray(levels, dtype=np.float32), int(block_s * rate))


# 0.5 s blocks at these levels: 1 s windows every 0.5 s have P(Laughter) 0.5, 0.625, 0.25, 0, 0.4375 (dyadic: exact)
BLOCKS = [0.25, 0.75, 0.5, 0.0, 0.0, 0.875]


@pytest.mark.parametrize("threshold, window_s, hop_s, expected", [
    (0.6, 1.0, 0.5, [(0.5, 1.5)]),  # one window
    (0.45, 1.0, 0.5, [(0.0, 1.5)]),  # windows at 0 and 0.5 s overlap: merged
    (0.4, 1.0, 0.5, [(0.0, 1.5), (2.0, 3.0)]),  # the window at 2 s starts after 1.5 s: a second segment
    (0.2, 1.0, 0.5, [(0.0, 3.0)]),  # the window at 1 s joins them; the one at 2 s starts where it ends: merged
    (0.45, 0.5, 0.5, [(0.5, 1.5), (2.5, 3.0)]),  # half-second windows are the blocks: 0.75, 0.5 and 0.875 pass
])
def test_laughter_detector_segments_at_intermediate_thresholds(threshold, window_s, hop_s, expected):
    extractor = Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=16000, padding_value=0.0, do_normalize=False)
    detector = AudioClassifierLaughterDetector(parts=(LevelLaughterClassifier(), extractor), threshold=threshold,
                                               window_s=window_s, hop_s=hop_s)
    assert detector.segments(level_blocks(BLOCKS)) == expected


def tiny_emotion2vec_config():
    audio = dict(feature_encoder_spec="[(32, 10, 5)] + [(32, 3, 2)] * 2 + [(32, 2, 2)]", extractor_mode="layer_norm",
                 conv_pos_depth=2, conv_pos_width=8, conv_pos_groups=4, conv_pos_pre_ln=False,
                 start_drop_path_rate=0.0, end_drop_path_rate=0.0, prenet_depth=1, prenet_layerdrop=0.0,
                 prenet_dropout=0.0, decoder=None, use_alibi_encoder=True, local_grad_mult=1.0, num_extra_tokens=0,
                 init_extra_token_zero=True, learned_alibi_scale=True, alibi_scale=1.0, learned_alibi=False,
                 num_alibi_heads=4, model_depth=2, learned_alibi_scale_per_layer=True,
                 learned_alibi_scale_per_head=True, alibi_max_pos=None, type="AUDIO")
    model_conf = dict(depth=2, start_drop_path_rate=0.0, end_drop_path_rate=0.0, num_heads=4, norm_eps=1e-5,
                      norm_affine=True, encoder_dropout=0.0, post_mlp_drop=0.0, attention_dropout=0.0,
                      activation_dropout=0.0, dropout_input=0.0, layerdrop=0.0, embed_dim=32, mlp_ratio=2.0,
                      layer_norm_first=False, average_top_k_layers=2, end_of_block_targets=False, loss_beta=0.0,
                      loss_scale=None, normalize=True, modalities=dict(audio=audio))
    return dict(model="Emotion2vec", model_conf=model_conf, tokenizer="CharTokenizer",
                tokenizer_conf=dict(token_list="tokens.txt", unk_symbol="<unk>"))


def test_emotion2vec_loads_the_published_folder(tmp_path):
    import yaml

    from vocalign.rewards.emotion import Emotion2vecClassifier
    from vocalign.rewards.funasr_loader import build_funasr

    config = tiny_emotion2vec_config()
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config, allow_unicode=True))
    (tmp_path / "tokens.txt").write_text("\n".join(EMOTIONS) + "\n")
    torch.manual_seed(0)
    built = build_funasr({**config, "tokenizer_conf": {"token_list": EMOTIONS, "unk_symbol": "<unk>"}})
    torch.save(built.model.state_dict(), tmp_path / "model.pt")

    classifier = Emotion2vecClassifier(tmp_path)
    assert classifier.labels == EMOTIONS
    reward = EmotionReward(emotion_classifier=classifier)
    audio = noise()
    probs = classifier.probabilities([audio])[0]
    assert probs.shape == (9,) and probs.sum() == pytest.approx(1.0, abs=1e-5)
    sad, unspecified = reward.score([Sample(audio, 16000, "x", "zh", emotion="sad"), Sample(audio, 16000, "x", "zh")])
    assert sad.value == pytest.approx(probs[6]) and unspecified.value == pytest.approx(1 - probs[4])


class CountingEncoder:
    """Test double: a deterministic 'embedding' of each clip, recording how many clips each call embeds."""

    def __init__(self):
        self.calls = []

    def embed(self, audios):
        self.calls.append(len(audios))
        return np.stack([[a[:100].mean(), a[:100].std(), a[100:200].mean()] for a in audios])


def test_each_distinct_voice_prompt_is_embedded_once_with_the_same_scores():
    prompt_a, prompt_b = noise(seed=1), noise(seed=2)
    samples = [Sample(noise(seed=10 + i), 16000, "x", "en", p, 16000)
               for i, p in enumerate([prompt_a] * 3 + [prompt_b.copy() for _ in range(3)])]
    encoder = CountingEncoder()
    reward = SpeakerSimilarityReward(speaker_encoder=encoder)
    scores = reward.score(samples)
    assert encoder.calls == [6 + 2]  # six outputs, two distinct prompts (equal content counts once)
    singles = [reward.score([s])[0].value for s in samples]
    assert [s.value for s in scores] == pytest.approx(singles)
