"""bench/span_alignment.py on a few espeak-ng utterances: the true word times it builds, and the CER reward's wrong
spans landing on the altered word (the full check runs >= 50 utterances; see the bench's docstring)."""

import importlib.util
import sys

import numpy as np

from .conftest import REPO
from .speech import needs_espeak


def load_bench(monkeypatch):
    spec = importlib.util.spec_from_file_location("span_alignment", REPO / "bench" / "span_alignment.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "span_alignment", module)  # its dataclass looks its module up while defined
    spec.loader.exec_module(module)
    return module


def test_the_true_word_time_is_where_the_word_is_loud(monkeypatch):
    bench = load_bench(monkeypatch)
    tone = 0.5 * np.sin(np.arange(8000) / 3).astype(np.float32)  # 0.5 s at 16 kHz
    audio = np.concatenate([np.zeros(4000, np.float32), tone, np.zeros(1600, np.float32)])
    assert bench.loud_interval(audio, 16000) == (0.25, 0.75)


@needs_espeak
def test_wrong_spans_land_on_the_replaced_or_inserted_word(monkeypatch):
    bench = load_bench(monkeypatch)
    cases = bench.make_cases(5, seed=0)
    for case in cases:
        assert case.spoken != case.reference and len(case.spoken.split()) - len(case.reference.split()) in (0, 1)
        assert 0.0 < case.word_end_s - case.word_start_s < 1.0
        assert case.word_end_s <= len(case.audio) / case.sample_rate
    assert {c.kind for c in cases} == {"replace", "insert"}
    figures = bench.measure(cases, bench.demo_cer_reward())
    assert figures["hit_rate"] == 1.0, figures
    assert figures["share_of_audio_marked_wrong"] < 0.5, figures  # not everything marked wrong
