"""The seed-tts-eval speaker verifier: its published checkpoint layout loads onto transformers' WavLM."""

import re

import numpy as np
import pytest
import torch
from transformers import WavLMConfig, WavLMModel

from vocalign.rewards.base import Sample
from vocalign.rewards.ecapa_wavlm import EcapaWavLM, EcapaWavLMEncoder, convert_upstream_key
from vocalign.rewards.similarity import SpeakerSimilarityReward

# fairseq/UniSpeech names, written out independently of the converter, for the tiny model below
FAIRSEQ_NAMES = [
    (r"feature_extractor\.conv_layers\.(\d+)\.conv\.weight", r"feature_extractor.conv_layers.\1.0.weight"),
    (r"feature_extractor\.conv_layers\.(\d+)\.layer_norm\.(\w+)", r"feature_extractor.conv_layers.\1.2.1.\2"),
    (r"feature_projection\.layer_norm\.(\w+)", r"layer_norm.\1"),
    (r"feature_projection\.projection\.(\w+)", r"post_extract_proj.\1"),
    (r"masked_spec_embed", "mask_emb"),
    (r"encoder\.pos_conv_embed\.conv\.bias", "encoder.pos_conv.0.bias"),
    (r"encoder\.pos_conv_embed\.conv\.parametrizations\.weight\.original0", "encoder.pos_conv.0.weight_g"),
    (r"encoder\.pos_conv_embed\.conv\.parametrizations\.weight\.original1", "encoder.pos_conv.0.weight_v"),
    (r"encoder\.layer_norm\.(\w+)", r"encoder.layer_norm.\1"),
    (r"encoder\.layers\.(\d+)\.attention\.(\w)_proj\.(\w+)", r"encoder.layers.\1.self_attn.\2_proj.\3"),
    (r"encoder\.layers\.(\d+)\.attention\.out_proj\.(\w+)", r"encoder.layers.\1.self_attn.out_proj.\2"),
    (r"encoder\.layers\.(\d+)\.attention\.rel_attn_embed\.weight", r"encoder.layers.\1.self_attn.relative_attention_bias.weight"),
    (r"encoder\.layers\.(\d+)\.attention\.gru_rel_pos_linear\.(\w+)", r"encoder.layers.\1.self_attn.grep_linear.\2"),
    (r"encoder\.layers\.(\d+)\.attention\.gru_rel_pos_const", r"encoder.layers.\1.self_attn.grep_a"),
    (r"encoder\.layers\.(\d+)\.layer_norm\.(\w+)", r"encoder.layers.\1.self_attn_layer_norm.\2"),
    (r"encoder\.layers\.(\d+)\.feed_forward\.intermediate_dense\.(\w+)", r"encoder.layers.\1.fc1.\2"),
    (r"encoder\.layers\.(\d+)\.feed_forward\.output_dense\.(\w+)", r"encoder.layers.\1.fc2.\2"),
    (r"encoder\.layers\.(\d+)\.final_layer_norm\.(\w+)", r"encoder.layers.\1.final_layer_norm.\2"),
]


def to_fairseq(name):
    for pattern, replacement in FAIRSEQ_NAMES:
        if re.fullmatch(pattern, name):
            return re.sub(pattern, replacement, name)
    raise AssertionError(f"no fairseq name for {name}")


def tiny_model(seed):
    torch.manual_seed(seed)
    wavlm = WavLMModel(WavLMConfig(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
                                   conv_dim=(16, 16), conv_stride=(5, 4), conv_kernel=(10, 8),
                                   num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=2, num_buckets=8,
                                   max_bucket_distance=16, feat_extract_norm="layer", do_stable_layer_norm=True))
    model = EcapaWavLM(wavlm, channels=16, emb_dim=8, pooled=24)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)  # no parameter left at its init value, so a wrong load shows
    return model.eval()


def write_published(model, path, drop=None):
    state = {}
    for key, value in model.state_dict().items():
        if key.startswith("wavlm."):
            key = "feature_extract.model." + to_fairseq(key.removeprefix("wavlm."))
        if key != drop:
            state[key] = value
    state["feature_extract.model.label_embs_concat"] = torch.zeros(3, 4)  # pre-training leftover
    torch.save({"model": state}, path)


def test_published_layout_round_trips_onto_transformers_wavlm(tmp_path):
    source = tiny_model(0)
    write_published(source, tmp_path / "wavlm_large_finetune.pth")
    loaded = tiny_model(1)
    loaded.load_published(tmp_path / "wavlm_large_finetune.pth")
    wav = torch.from_numpy(np.random.default_rng(0).normal(0, 0.1, 16000).astype(np.float32)).unsqueeze(0)
    with torch.no_grad():
        torch.testing.assert_close(loaded(wav), source(wav))
    reward = SpeakerSimilarityReward(speaker_encoder=EcapaWavLMEncoder(model=loaded))
    a = wav[0].numpy()
    out = reward.score([Sample(a, 16000, "", "en", a, 16000)])
    assert out[0].value == pytest.approx(1.0, abs=1e-5)


def test_missing_or_unknown_keys_name_the_file_and_key(tmp_path):
    source = tiny_model(0)
    write_published(source, tmp_path / "ckpt.pth", drop="layer2.SE_Connect.linear1.weight")
    with pytest.raises(ValueError, match=r"ckpt\.pth does not match.*missing keys \['layer2\.SE_Connect\.linear1\.weight'\]"):
        tiny_model(1).load_published(tmp_path / "ckpt.pth")
    with pytest.raises(KeyError, match="unknown WavLM upstream key 'encoder.mystery'"):
        convert_upstream_key("encoder.mystery")
