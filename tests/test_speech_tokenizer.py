"""The Whisper-VQ speech tokenizer: published folder layout, 25 Hz codes, strict loading."""

import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from vocalign.policies.checkpoints import write_tiny_checkpoint
from vocalign.policies.speech_tokenizer import SpeechTokenizer, block_causal_mask


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("ckpt")) / "speech_tokenizer"


def test_25_hz_codes_in_range_and_long_audio_in_segments(folder):
    tokenizer = SpeechTokenizer.from_pretrained(folder)
    rng = np.random.default_rng(0)
    codes = tokenizer([rng.normal(0, 0.1, 16000 * 3).astype(np.float32), rng.normal(0, 0.1, 8000).astype(np.float32),
                       rng.normal(0, 0.1, 16000 * 31).astype(np.float32)])
    assert [len(c) for c in codes] == [75, 13, 31 * 25]  # 0.5 s: 12.5 tokens, the last one partial
    assert all(0 <= c < 64 for row in codes for c in row)


def test_codes_do_not_depend_on_batch_company(folder):
    tokenizer = SpeechTokenizer.from_pretrained(folder)
    rng = np.random.default_rng(1)
    a, b = rng.normal(0, 0.1, 16000).astype(np.float32), rng.normal(0, 0.1, 40000).astype(np.float32)
    assert tokenizer([a, b])[0] == tokenizer([a])[0]


def test_block_causal_mask_by_hand():
    keep = torch.tensor([[True, True, True, False]])
    allowed = block_causal_mask(keep, block=2, dtype=torch.float32)[0, 0] == 0
    # frame 0 sees its block (0, 1); frame 2 sees 0-2 (causal) and its block minus padding
    assert allowed.tolist() == [[True, True, False, False], [True, True, False, False],
                                [True, True, True, False], [True, True, True, False]]


def test_missing_key_and_wrong_config_are_named(folder, tmp_path):
    broken = tmp_path / "tok"
    shutil.copytree(folder, broken)
    state = load_file(str(broken / "model.safetensors"))
    state.pop("codebook.weight")
    save_file(state, str(broken / "model.safetensors"))
    with pytest.raises(ValueError, match=r"model\.safetensors does not match the model: missing keys \['codebook\.weight'\]"):
        SpeechTokenizer.from_pretrained(broken)
    config = json.loads((broken / "config.json").read_text())
    config.pop("quantize_vocab_size")
    (broken / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="not a Whisper-VQ speech tokenizer"):
        SpeechTokenizer.from_pretrained(broken)
