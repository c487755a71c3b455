"""Parity with the released GLM-TTS code: golden fixtures made by running the release (see fixtures/glmtts/README.md)."""

import json
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from vocalign.policies.checkpoints import TINY_CHARACTERS, write_vocos2d
from vocalign.policies.codec import FlowCondition, GLMTTSCodec, VoicePrompt
from vocalign.policies.flow import FlowConfig, FlowInput, FlowMatching
from vocalign.policies.frontend.g2p import RELEASE_TABLES, PhonemeFrontend, read_inventory
from vocalign.policies.frontend.text import normalize_text, split_text
from vocalign.policies.frontend.tokenizer import build_char_tokenizer
from vocalign.policies.long_text import Turn, chunk_prompt
from vocalign.policies.mel import MEL_24K, log_mel
from vocalign.policies.pipeline import lm_text_chunks
from vocalign.policies.sampling import filter_logits, sample
from vocalign.policies.speech_tokenizer import SpeechTokenizer
from vocalign.policies.streaming import RELEASED_BLOCKS, RELEASED_FADE_S, RELEASED_LOOKAHEAD, block_causal_mask
from vocalign.policies.vocoder import HiFT, HiFTConfig
from vocalign.policies.vocos2d import Vocos2DConfig, Vocos2DTorchScript

from .conftest import REPO, SHARED

FIXTURES = REPO / "tests" / "fixtures" / "glmtts"
G2P_TABLES = SHARED / "glmtts-data"  # the release's configs/ G2P files


def weights(tensors: dict, prefix: str = "weights.") -> dict:
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


# ------------------------------------------------------------------------------------------------ sampling
@pytest.fixture(scope="module")
def nucleus():
    return load_file(FIXTURES / "sampling.safetensors")


def test_nucleus_candidate_sets_match_the_release(nucleus):
    kept = ~torch.isinf(filter_logits(nucleus["logits"], 25, 0.8))
    matched = 0
    for row, candidates in zip(kept, nucleus["candidates"]):
        matched += set(row.nonzero().flatten().tolist()) == set(candidates[candidates >= 0].tolist())
    assert matched == len(kept)  # 300/300 logit vectors


class FixedLogits(torch.nn.Module):
    """Test double for an LM: every row's next-token logits are fixed, whatever the input."""

    def __init__(self, logits):
        super().__init__()
        self.logits = logits

    def forward(self, input_ids, **kwargs):
        return SimpleNamespace(logits=self.logits[:, None, :], past_key_values=kwargs.get("past_key_values"))


def test_draws_follow_the_released_distribution(nucleus):
    rows, counts = nucleus["draw_rows"], nucleus["draw_counts"].float()
    repeats = 1000
    logits = nucleus["logits"][rows].repeat_interleave(repeats, 0)
    ids = torch.zeros(len(logits), 1, dtype=torch.long)
    torch.manual_seed(0)
    drawn = sample(FixedLogits(logits), ids, torch.ones_like(ids), max_new_tokens=1, stop_token_id=None,
                   pad_token_id=0, top_k=25, top_p=0.8).tokens.view(len(rows), repeats)
    ours = torch.stack([torch.bincount(r, minlength=counts.shape[1]) for r in drawn]).float()
    released = counts / counts.sum(-1, keepdim=True)
    assert (ours[released == 0] == 0).all()  # nothing outside the release's nucleus is ever drawn
    total_variation = 0.5 * (ours / repeats - released).abs().sum(-1)
    assert total_variation.max() < 0.08, total_variation  # 1000 vs 4000 draws: sampling noise is about 0.03


# ------------------------------------------------------------------------------------------------ text
@pytest.fixture(scope="module")
def texts():
    return json.loads((FIXTURES / "text.json").read_text(encoding="utf-8"))


def test_normalisation_matches_the_release(texts):
    cases = texts["normalise"]
    got = [normalize_text(case["input"]) for case in cases]
    assert len(cases) >= 30
    assert got == [case["output"] for case in cases]


def test_splitting_matches_the_release(texts):
    for case in texts["split"]:
        chunks = split_text(case["input"])
        if "chunks" in case:
            assert chunks == case["chunks"]
        else:  # the release's hard cut fails on it; ours keeps the sentence whole
            assert case["error"] == "IndexError" and chunks == [case["input"]]
        if "normalised_chunks" in case:  # the release's order: normalise, split, normalise each chunk
            assert [normalize_text(c) for c in split_text(normalize_text(case["input"]))] == case["normalised_chunks"]


def test_long_text_prompts_match_the_release():
    release = json.loads((FIXTURES / "long_text.json").read_text(encoding="utf-8"))
    voice = Turn.of(release["prompt_text_ids"], release["prompt_codes"])
    history: list[Turn] = []
    dropped = 0
    for call in release["calls"]:
        prompt = chunk_prompt(voice, history, call["chunk_ids"], release["budget"])
        assert prompt.text_ids == call["prompt_text_ids"] and prompt.codes == call["prompt_codes"]
        dropped += len(history) - len(prompt.history)
        history = prompt.history + [Turn.of(call["chunk_ids"], call["generated"])]
    assert dropped == 3  # the long fourth chunk prunes all three earlier chunks, and they stay dropped


# ------------------------------------------------------------------------------------------------ flow, HiFT
def fixture_flow() -> FlowMatching:
    """The tiny flow of flow.safetensors (its weights are those the release ran with)."""
    flow = FlowMatching(FlowConfig(vocab_size=64, speech_token_dim=32, trans_dim=32, depth=2, heads=2, dim_head=16,
                                   conv_layers=2, spkr_emb_adaLN=True, remove_spkr_concat_condition=True))
    flow.load_state_dict(weights(load_file(FIXTURES / "flow.safetensors")))
    return flow.eval()


def test_flow_mel_matches_the_release():
    data = load_file(FIXTURES / "flow.safetensors")
    flow = fixture_flow()
    mel = flow.generate([FlowInput(data["tokens"], data["prompt_tokens"], data["prompt_mel"], data["speaker"])],
                               steps=4, noise=[data["noise"]])[0]
    # 20 prompt tokens + 16 new -> 72 frames; the prompt's 39 mel frames are dropped, as released
    assert mel.shape == data["mel"].shape == (80, 33)
    torch.testing.assert_close(mel, data["mel"], atol=2e-6, rtol=0)  # measured 2.4e-7 on mels up to 3.8


def test_hift_audio_matches_the_release():
    data = load_file(FIXTURES / "hift.safetensors")
    hift = HiFT(HiFTConfig(base_channels=16, f0_channels=8))
    hift.load_state_dict(weights(data))
    torch.manual_seed(6)  # the source's random phase and noise, drawn in the release's order
    audio = hift.eval()(data["mel"][None])[0]
    assert audio.shape == data["audio"].shape == (24 * 480,)
    torch.testing.assert_close(audio, data["audio"], atol=1e-6, rtol=0)  # measured 1.1e-7


# ------------------------------------------------------------------------------------------------ streaming
def test_block_causal_mask_matches_the_release():
    released = load_file(FIXTURES / "stream.safetensors")["block_mask_2_4_8"].bool()
    assert torch.equal(block_causal_mask([2, 4, 8], 40), released)


def stream_as_released(vocoder, tokens: torch.Tensor, seed: int) -> tuple[list[torch.Tensor], list[np.ndarray]]:
    """Each pass's mel and the emitted pieces of GLMTTSCodec.stream on the fixture flow and prompt, with the release's
    schedule, after ``torch.manual_seed(seed)`` (each pass's noise, and HiFT's, drawn in the release's order)."""
    data = load_file(FIXTURES / "stream.safetensors")
    flow = fixture_flow()
    tokenizer_stand_in = SimpleNamespace(encoder=SimpleNamespace(config=SimpleNamespace(quantize_vocab_size=64)))
    codec = GLMTTSCodec(tokenizer_stand_in, flow, vocoder, speaker=None)
    prompt = VoicePrompt("", data["prompt_tokens"].tolist(), FlowCondition(data["prompt_mel"], data["speaker"]))
    mels, generate_streaming = [], flow.generate_streaming
    flow.generate_streaming = lambda *args: (lambda out: (mels.append(out[0]), out)[1])(generate_streaming(*args))
    torch.manual_seed(seed)
    pieces = list(codec.stream(tokens.tolist(), prompt, 10, RELEASED_BLOCKS, RELEASED_LOOKAHEAD, RELEASED_FADE_S))
    return mels, pieces


def test_streaming_with_vocos2d_matches_the_releases_token2wav_stream(tmp_path):
    data = load_file(FIXTURES / "stream.safetensors")
    torch.manual_seed(12)  # the tiny Vocos2D the release ran, rebuilt from its seed
    write_vocos2d(tmp_path / "generator_jit.ckpt", Vocos2DConfig(channels=4, depth=1))
    mels, pieces = stream_as_released(Vocos2DTorchScript(tmp_path / "generator_jit.ckpt"), data["tokens"], seed=3)
    # 100 tokens: blocks of 25, 50 and 25, each pass's mel over all tokens so far (the prompt's 39 frames dropped)
    assert [m.shape[1] for m in mels] == [51, 151, 201]
    for k, mel in enumerate(mels):  # measured 4.8e-7 on mels up to about 4
        torch.testing.assert_close(mel, data[f"mel.{k}"], atol=2e-6, rtol=0)
    assert [len(p) for p in pieces] == data["piece_lengths"].tolist()
    np.testing.assert_allclose(np.concatenate(pieces), data["audio"].numpy(), atol=1e-6, rtol=0)  # measured 4.5e-8


def test_streaming_with_hift_matches_the_releases_token2wav_stream():
    data = load_file(FIXTURES / "stream_hift.safetensors")
    hift = HiFT(HiFTConfig(base_channels=16, f0_channels=8))
    hift.load_state_dict(weights(load_file(FIXTURES / "hift.safetensors")))
    mels, pieces = stream_as_released(hift.eval(), data["tokens"], seed=4)
    assert [m.shape[1] for m in mels] == [51, 121]  # 60 tokens: blocks of 25 and 35
    for k, mel in enumerate(mels):
        torch.testing.assert_close(mel, data[f"mel.{k}"], atol=2e-6, rtol=0)
    assert [len(p) for p in pieces] == data["piece_lengths"].tolist()
    np.testing.assert_allclose(np.concatenate(pieces), data["audio"].numpy(), atol=1e-6, rtol=0)


# ------------------------------------------------------------------------------------------------ phoneme-in
@pytest.mark.skipif(not G2P_TABLES.is_dir(), reason="shared/glmtts-data is not beside the checkout")
def test_phoneme_in_prompt_ids_match_the_release():
    phonemes = PhonemeFrontend.from_release_configs(G2P_TABLES)
    tokenizer = build_char_tokenizer(TINY_CHARACTERS, read_inventory(G2P_TABLES / RELEASE_TABLES[0]), 64)
    cases = json.loads((FIXTURES / "phoneme_in.json").read_text(encoding="utf-8"))["cases"]
    for case in cases:
        chunks = lm_text_chunks(case["text"], phonemes)
        assert chunks == case["phoneme_chunks"], case["text"]
        assert [tokenizer(c, add_special_tokens=False).input_ids for c in chunks] == case["chunk_ids"]
    assert sum(len(c["chunk_ids"]) for c in cases) == 9  # the long text is three chunks, each converted


# ------------------------------------------------------------------------------------------------ speech tokenizer
@pytest.fixture(scope="module")
def speech():
    expected = json.loads((FIXTURES / "speech_tokenizer.json").read_text())
    audio = load_file(FIXTURES / "speech_tokenizer_audio.safetensors")
    clips = [audio[name].numpy().astype(np.float32) / 32767 for name in ("clip_a", "clip_b")]
    return expected, clips


@pytest.mark.parametrize("variant", ["plain", "block_causal", "causal_conv_block", "causal_conv_attention",
                                     "causal_attention"])
def test_speech_codes_match_the_release_under_each_causal_setting(speech, variant, tmp_path):
    expected, clips = speech
    folder = tmp_path / "speech_tokenizer"
    shutil.copytree(FIXTURES / "speech_tokenizer_released", folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **expected["variants"][variant]}))
    assert SpeechTokenizer.from_pretrained(folder)(clips) == expected["codes"][variant]


def test_released_key_layout_loads_and_missing_weights_are_refused(tmp_path):
    from safetensors.torch import save_file

    folder = FIXTURES / "speech_tokenizer_released"
    state = load_file(folder / "model.safetensors")
    # the published file carries the full model: a third layer, the final layer norm and decoder weights
    assert "model.encoder.layers.2.fc1.weight" in state and "model.encoder.layer_norm.weight" in state
    SpeechTokenizer.from_pretrained(folder)
    broken = tmp_path / "broken"
    shutil.copytree(folder, broken)
    state.pop("model.encoder.layers.1.fc1.weight")
    save_file(state, str(broken / "model.safetensors"))
    with pytest.raises(ValueError, match=r"does not match the model: missing keys \['layers\.1\.fc1\.weight'\]"):
        SpeechTokenizer.from_pretrained(broken)


def test_a_3_3_s_prompt_gives_the_released_token_and_frame_counts(speech):
    expected, clips = speech
    counts = expected["prompt_3_3s"]
    tokenizer = SpeechTokenizer.from_pretrained(FIXTURES / "speech_tokenizer_released")
    audio24 = np.round(0.3 * np.sin(2 * np.pi * 180 * np.arange(int(3.3 * 24000)) / 24000) * 32767) / 32767
    frames = log_mel(torch.from_numpy(audio24).float(), MEL_24K).shape[-1]
    assert (len(tokenizer([clips[0]])[0]), frames) == (counts["tokens"], counts["mel_frames_24k"]) == (83, 165)
