"""Text front end: normalisation, splitting, phoneme-in with the released G2P tables."""

import json
import random

import pytest

from vocalign.policies.frontend.g2p import ChineseG2P, PhonemeFrontend, syllable_phonemes
from vocalign.policies.frontend.text import normalize_text, split_text, split_units, weight

from .conftest import SHARED

DATA = SHARED / "glmtts-data"
needs_data = pytest.mark.skipif(not DATA.is_dir(), reason="shared/glmtts-data is not beside the checkout")


def test_normalisation_rules_and_bad_input():
    # the release's behaviour on many more texts is checked against its own output in test_glmtts_fixtures
    assert normalize_text("气温25℃，涨了12.5%！") == "气温二十五摄氏度，涨了百分之十二点五。"
    assert normalize_text("《红楼梦》（清代）") == "红楼梦清代。"
    assert normalize_text("I have 2 cats!") == "i have two cats."
    assert normalize_text("你好吗?") == "你好吗?"  # a question keeps its mark
    with pytest.raises(TypeError, match="must be a string"):
        normalize_text(None)


def test_each_text_is_normalised_once(monkeypatch):
    # GRPO normalises the same prompt texts at every step: the ~30 ms WeTextProcessing pass must run once per text
    import vocalign.policies.frontend.text as frontend

    zh_tn, en_tn = frontend._wetext()
    calls = []
    monkeypatch.setattr(frontend, "_wetext", lambda: (zh_tn, lambda t: calls.append(t) or en_tn(t)))
    text = "Cached normalisation of 3 unique words, checked once."
    first = normalize_text(text)
    assert normalize_text(text) == first == "cached normalisation of three unique words, checked once."
    assert len(calls) == 1


def test_split_units_weights_and_hard_cut():
    assert split_units("Hi there, 你好 it's") == ["Hi ", "there", ", ", "你", "好 ", "it's"]
    assert weight(["extraordinary "]) == pytest.approx(0.7 * 6) and weight(["你", "，"]) == 2
    text = "这" * 130  # no punctuation: cut every 60 units
    assert [len(c) for c in split_text(text)] == [60, 60, 10]
    # a cut that would start the next chunk with punctuation takes the mark along
    assert [len(c) for c in split_text("这" * 60 + "，" + "那" * 5, min_chars=90)] == [61, 5]
    assert [len(c) for c in split_text("这" * 59 + "，" + "那" * 5, min_chars=90)] == [60, 5]
    english = ("This is the first sentence of a long paragraph. It keeps going with more words than one chunk can "
               "hold, so it must be split. Short one. And the end.")
    assert "".join(split_text(english)) == english
    assert split_text("   ") == []


@pytest.mark.parametrize("initial, final, expected", [
    ("sh", "i4", ["SH", "III4"]), ("z", "i4", ["Z", "II4"]), ("r", "i4", ["R", "III4"]),
    ("x", "ian2", ["X", "IAN2"]), ("", "van2", ["VAN2"]), ("l", "i3", ["L", "I3"]),
])
def test_syllable_rules(initial, final, expected):
    assert syllable_phonemes(initial, final) == expected


def test_g2p_reads_words_in_context():
    g2p = ChineseG2P()
    assert g2p.word("知识") == [["ZH", "III1"], ["SH", "III2"]]
    assert g2p.word("银行") == [["IN2"], ["H", "ANG2"]]  # hang2 in this word, not xing2
    assert g2p.word("行走") == [["X", "ING2"], ["Z", "OU3"]]
    assert g2p.word("鬼") == [["G", "UEI3"]] and g2p.word("绿") == [["L", "V4"]]


def test_user_dictionary_polyphones_become_phonemes_others_stay_text(tmp_path):
    user = tmp_path / "mine.jsonl"
    user.write_text(json.dumps({"银行": "<|IN2|><|H|><|ANG2|>"}, ensure_ascii=False) + "\n"
                    + json.dumps({"行": "<|X|><|ING2|>"}, ensure_ascii=False) + "\n")
    phonemes = tmp_path / "phonemes.json"
    phonemes.write_text(json.dumps(["IN2", "H", "ANG2", "X", "ING2"]))
    frontend = PhonemeFrontend.from_files(phonemes, [user])
    # longest match first: 银行 as a word, then the lone 行; everything else untouched, English included
    assert frontend.convert("去银行，行不行？OK, let's go.") == (
        "去<|IN2|><|H|><|ANG2|>，<|X|><|ING2|>不<|X|><|ING2|>？OK, let's go.")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('["not", "a", "mapping"]\n')
    with pytest.raises(TypeError, match=r"bad\.jsonl:1: expected \{word: replacement\}"):
        PhonemeFrontend.from_files(phonemes, [bad])


@needs_data
def test_released_tables_rare_characters_and_replace_dict():
    frontend = PhonemeFrontend.from_files(DATA / "G2P_all_phonemes.json", [DATA / "G2P_replace_dict.jsonl"],
                                          DATA / "G2P_able_1word.json")
    out = frontend.convert("乡音无改鬓毛衰。Hello world")
    assert out == "乡音无改鬓毛<|C|><|UEI1|>。Hello world"
    readable = set(json.loads((DATA / "G2P_able_1word.json").read_text()))
    assert "饕" not in readable and "餮" not in readable
    assert frontend.convert("他是老饕餮") == "他是老<|T|><|AO1|><|T|><|IE4|>"  # rare characters read by G2P
    assert frontend.convert("是知识") == "是知识"  # readable characters stay text


def test_training_augmentation_converts_a_share_and_never_dictionary_entries():
    frontend = PhonemeFrontend(ChineseG2P(), {"衰": "<|C|><|UEI1|>"})
    text = "今天天气很好我们一起去公园散步吧衰"
    assert frontend.augment(text, random.Random(0), probability=0.0) == "今天天气很好我们一起去公园散步吧<|C|><|UEI1|>"
    converted = frontend.convert(text, phoneme_share=0.5, rng=random.Random(3))
    assert converted.endswith("<|C|><|UEI1|>") and "<|" in converted[:-13]
    assert sum(ch in text for ch in converted) < len(text) - 1  # some ordinary characters became phonemes


def test_characters_pypinyin_misreads_are_read_as_released():
    g2p = ChineseG2P()
    assert g2p.word("呣") == g2p.word("母") == [["M", "U3"]]
    assert g2p.word("嗯") == g2p.word("恩") == [["EN1"]]
    frontend = PhonemeFrontend(g2p, text_readable=set("好"))
    assert frontend.convert("呣好") == "<|M|><|U3|>好"  # the character stays 呣 where it is not converted
    assert PhonemeFrontend(g2p).convert("呣，嗯") == "呣，嗯"


@needs_data
def test_release_configs_folder_loads_and_missing_tables_are_named(tmp_path):
    frontend = PhonemeFrontend.from_release_configs(DATA)
    assert frontend.convert("他是老饕餮") == "他是老<|T|><|AO1|><|T|><|IE4|>"  # the readable set applies
    assert frontend.convert("弦") == "<|X|><|IAN2|>"  # and the replace dictionary
    (tmp_path / "G2P_all_phonemes.json").write_text((DATA / "G2P_all_phonemes.json").read_text())
    with pytest.raises(FileNotFoundError, match=r"missing \['G2P_replace_dict\.jsonl', 'G2P_able_1word\.json'\]"):
        PhonemeFrontend.from_release_configs(tmp_path)
