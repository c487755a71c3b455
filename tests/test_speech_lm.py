"""The speech LM on a tiny checkpoint in the published layout: loading, prompt layout, sampling bounds, log-probs."""

import copy
import json
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file, save_file

from vocalign.common.generation import SamplingParams
from vocalign.policies.checkpoints import TinySizes, write_tiny_checkpoint
from vocalign.policies.sampling import RELEASED_SAMPLING
from vocalign.policies.speech_lm import SpeechLM, TTSPrompt
from vocalign.rlhf.loss import completion_logps

from .conftest import SHARED

PHONEMES = SHARED / "glmtts-data" / "G2P_all_phonemes.json"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    return write_tiny_checkpoint(root, TinySizes(num_codes=64), PHONEMES if PHONEMES.is_file() else None)


def test_prompt_layout(ckpt):
    lm = SpeechLM.from_pretrained(ckpt, num_codes=64)
    ids, n_text = lm.encode(TTSPrompt("你好", "hi", [3, 5]))
    tok = lm.tokenizer
    expected = (tok("hi ", add_special_tokens=False).input_ids + tok("你好", add_special_tokens=False).input_ids
                + [lm.vocab.begin_of_audio, lm.vocab.audio_0 + 3, lm.vocab.audio_0 + 5])
    assert ids == expected and n_text == 2
    assert tok.convert_ids_to_tokens(ids)[-3:] == ["<|begin_of_audio|>", "<|audio_3|>", "<|audio_5|>"]
    with pytest.raises(ValueError, match="out of range"):
        lm.encode(TTSPrompt("你好", "hi", [64]))
    with pytest.raises(ValueError, match="empty"):
        lm.encode(TTSPrompt("", "hi", [1]))


def test_missing_or_mismatched_weights_name_the_file_and_key(ckpt, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(ckpt, broken)
    weights = load_file(str(broken / "llm" / "model.safetensors"))
    weights.pop("model.layers.1.mlp.up_proj.weight")
    save_file(weights, str(broken / "llm" / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"llm weights does not match its config: missing keys: "
                                         r"\['model\.layers\.1\.mlp\.up_proj\.weight'\]"):
        SpeechLM.from_pretrained(broken, num_codes=64)
    config = json.loads((ckpt / "llm" / "config.json").read_text())
    config["vocab_size"] = 100
    (broken / "llm" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"mismatched keys: \[.*model\.embed_tokens\.weight"):
        SpeechLM.from_pretrained(broken, num_codes=64)


def test_sampling_obeys_text_length_bounds_and_emits_only_speech(ckpt):
    lm = SpeechLM.from_pretrained(ckpt, num_codes=64)
    prompts = [TTSPrompt("今天天气很好", "你好", [1, 2, 3]), TTSPrompt("hi", "hello there", [4])]
    torch.manual_seed(0)
    _, _, out = lm.generate(prompts, num_generations=4, sampling=SamplingParams(temperature=1.5))
    lengths = out.mask.sum(-1)
    text_lengths = torch.tensor([6] * 4 + [2] * 4)
    assert (lengths >= 2 * text_lengths).all() and (lengths <= 20 * text_lengths).all()
    drawn = out.tokens[out.mask.bool()]
    speech = (drawn >= lm.vocab.audio_0) & (drawn < lm.vocab.audio_0 + 64)
    assert (speech | (drawn == lm.vocab.stop)).all()
    for row, codes in enumerate(lm.codes(out)):
        assert len(codes) == lengths[row] - int(out.stopped[row]) and all(0 <= c < 64 for c in codes)


def test_sampled_logps_equal_a_fresh_forward(ckpt):
    lm = SpeechLM.from_pretrained(ckpt, num_codes=64)
    torch.manual_seed(1)
    ids, mask, out = lm.generate([TTSPrompt("你好世界", "嗨", [1, 2]), TTSPrompt("hello", "a much longer prompt", [3])],
                                 num_generations=2,
                                 sampling=replace(RELEASED_SAMPLING, temperature=0.8, max_new_tokens=12))
    fresh = completion_logps(lm.model, torch.cat([ids, out.tokens], 1), torch.cat([mask, out.mask], 1),
                             out.tokens.shape[1], 0.8)
    torch.testing.assert_close(fresh * out.mask, out.logps, atol=1e-5, rtol=1e-4)


def test_samples_with_the_given_peft_model_not_the_wrapped_one(ckpt):
    from vocalign.rlhf.config import LoraSettings, wrap_lora

    lm = SpeechLM.from_pretrained(ckpt, num_codes=64)
    # peft injects its layers into the model it wraps, so the adapter goes on a copy: lm.model stays the base
    adapted = wrap_lora(copy.deepcopy(lm.model),
                        LoraSettings(r=2, lora_alpha=4, lora_dropout=0.0, target_modules=["q_proj", "v_proj"]))
    torch.manual_seed(2)
    with torch.no_grad():  # a fresh adapter (B = 0) is the identity: give it weight so that it changes the LM
        for name, weight in adapted.named_parameters():
            if "lora_B" in name:
                weight.normal_(0.0, 0.5)
    ids, mask, out = lm.generate([TTSPrompt("你好", "嗨", [1]), TTSPrompt("hello", "a longer prompt", [3, 4])],
                                 num_generations=2, model=adapted,
                                 sampling=replace(RELEASED_SAMPLING, temperature=0.8, max_new_tokens=8))
    assert out.mask.sum() > 0
    inputs = (torch.cat([ids, out.tokens], 1), torch.cat([mask, out.mask], 1), out.tokens.shape[1], 0.8)
    torch.testing.assert_close(completion_logps(adapted, *inputs) * out.mask, out.logps, atol=1e-5, rtol=1e-4)
    base = completion_logps(lm.model, *inputs) * out.mask
    assert (base - out.logps).abs().max() > 0.1  # the adapter matters: the base model's log-probs are far off


def test_training_example_is_the_inference_layout_with_labelled_speech(ckpt):
    lm = SpeechLM.from_pretrained(ckpt, num_codes=64)
    prompt = TTSPrompt("你好", "hi", [3, 5])
    prefix, _ = lm.encode(prompt)
    ids, labels = lm.training_example(prompt, [7, 8])
    speech = [lm.vocab.audio_0 + 7, lm.vocab.audio_0 + 8, lm.vocab.stop]
    assert ids == prefix + speech and labels == [-100] * len(prefix) + speech
    bare, _ = lm.encode(TTSPrompt("你好", "", []))  # no voice prompt: [text, <|begin_of_audio|>]
    assert bare == lm.tokenizer("你好", add_special_tokens=False).input_ids + [lm.vocab.begin_of_audio]
    with pytest.raises(ValueError, match="non-empty list in 0..63"):
        lm.training_example(prompt, [])
    with pytest.raises(ValueError, match="non-empty list in 0..63"):
        lm.training_example(prompt, [64])


def test_word_tokenizer_names_the_words_it_does_not_know():
    from transformers import LlamaConfig, LlamaForCausalLM

    from vocalign.policies.frontend.tokenizer import build_word_tokenizer

    tokenizer = build_word_tokenizer(["one", "two"], num_codes=4)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=8, intermediate_size=16,
                                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2))
    lm = SpeechLM(model, tokenizer, num_codes=4)
    ids, n_text = lm.encode(TTSPrompt("two one.", "one", [0, 3]))
    assert n_text == 3 and tokenizer.convert_ids_to_tokens(ids) == [
        "one", "two", "one", ".", "<|begin_of_audio|>", "<|audio_0|>", "<|audio_3|>"]
    with pytest.raises(ValueError, match=r"does not know \['fish'\]"):
        lm.encode(TTSPrompt("one fish two", "", []))


def test_whole_vocabulary_is_drawn_by_default_as_released(ckpt, tmp_path, caplog):
    import shutil

    assert SpeechLM.from_pretrained(ckpt, num_codes=64).speech_only  # the untrained tiny LM asks for speech only
    released = tmp_path / "released"
    shutil.copytree(ckpt, released)
    (released / "llm" / "generation_config.json").unlink()  # as the released checkpoint: no such setting
    lm = SpeechLM.from_pretrained(released, num_codes=64)
    assert not lm.speech_only
    torch.manual_seed(3)
    _, _, out = lm.generate([TTSPrompt("今天天气很好", "你好", [1, 2, 3])], num_generations=2,
                           sampling=replace(RELEASED_SAMPLING, max_new_tokens=20))
    drawn = out.tokens[out.mask.bool()]
    speech = (drawn >= lm.vocab.audio_0) & (drawn < lm.vocab.audio_0 + 64)
    assert (~speech & (drawn != lm.vocab.stop)).any()  # text tokens were drawn and did not stop generation
    with caplog.at_level("WARNING", logger="vocalign.policies.speech_lm"):
        codes = lm.codes(out)
    assert sum(map(len, codes)) == int(speech.sum()) and all(0 <= c < 64 for row in codes for c in row)
    assert "are not speech tokens" in caplog.text


def test_sampling_settings_travel_with_the_checkpoint(ckpt, tmp_path):
    import shutil

    from vocalign.policies.sampling import RepetitionAwareSampling

    assert SpeechLM.from_pretrained(ckpt, num_codes=64).ras == RepetitionAwareSampling(10, 0.1)  # as released
    copy = tmp_path / "ckpt"
    shutil.copytree(ckpt, copy)
    lm = SpeechLM.from_pretrained(copy, num_codes=64)
    lm.ras = None
    lm.save_sampling_settings(copy / "llm")
    again = SpeechLM.from_pretrained(copy, num_codes=64)
    assert again.ras is None and again.speech_only
    lm.ras = RepetitionAwareSampling(4, 0.5)
    lm.save_sampling_settings(copy / "llm")
    assert SpeechLM.from_pretrained(copy, num_codes=64).ras == RepetitionAwareSampling(4, 0.5)
    (copy / "llm" / "generation_config.json").write_text('{"repetition_aware_sampling": 3}')
    with pytest.raises(ValueError, match="repetition_aware_sampling must be"):
        SpeechLM.from_pretrained(copy, num_codes=64)
