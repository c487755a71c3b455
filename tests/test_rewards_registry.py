"""Finding plugins: built-ins, dotted paths, and a third-party package's entry point."""

import subprocess
import sys
import textwrap
import threading

import numpy as np
import pytest

from vocalign.rewards.base import RewardResult, Sample, available_rewards, build_reward, dependency_order, score_all
from vocalign.rewards.energy import EnergyReward


def test_builtin_and_dotted_path():
    assert {"cer", "sim", "emotion", "laughter", "energy"} <= set(available_rewards())
    plugin = build_reward("loud", target="vocalign.rewards.energy:EnergyReward", target_dbfs=-10.0)
    assert isinstance(plugin, EnergyReward) and plugin.name == "loud" and plugin.target == -10.0
    with pytest.raises(ValueError, match="unknown reward 'nope'"):
        build_reward("nope")
    with pytest.raises(ValueError, match="has no 'Missing'"):
        build_reward("x", target="vocalign.rewards.energy:Missing")


def test_third_party_entry_point_is_found_without_touching_vocalign(tmp_path):
    src = tmp_path / "src"
    (src / "pitchy").mkdir(parents=True)
    (src / "pitchy" / "__init__.py").write_text(textwrap.dedent("""
        from vocalign.rewards.base import RewardResult

        class LengthReward:
            name = "length"

            def __init__(self, per_second=1.0):
                self.per_second = per_second

            def score(self, samples):
                return [RewardResult(len(s.audio) / s.sample_rate * self.per_second) for s in samples]
    """))
    (src / "pyproject.toml").write_text(textwrap.dedent("""
        [build-system]
        requires = ["setuptools"]
        build-backend = "setuptools.build_meta"
        [project]
        name = "pitchy"
        version = "0.1"
        [project.entry-points."vocalign.rewards"]
        length = "pitchy:LengthReward"
    """))
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                    "--target", str(site), str(src)], check=True)
    sys.path.insert(0, str(site))
    try:
        assert available_rewards()["length"] == "pitchy:LengthReward"
        plugin = build_reward("length", per_second=2.0)
        assert plugin.score([Sample(np.zeros(8000, np.float32), 16000, "", "en")])[0].value == 1.0
    finally:
        sys.path.remove(str(site))
        sys.modules.pop("pitchy", None)


class Recorder:
    """Test double: records the upstream it is handed."""

    def __init__(self, name, requires=()):
        self.name, self.requires, self.seen = name, requires, None

    def score(self, samples, upstream=None):
        self.seen = upstream
        return [RewardResult(1.0, {"from": self.name}) for _ in samples]


def test_dependencies_run_first_and_are_handed_over():
    cer, laughter = Recorder("cer"), Recorder("laughter", ("cer",))
    assert [p.name for p in dependency_order([laughter, cer])] == ["cer", "laughter"]
    results = score_all([laughter, cer], [Sample(np.zeros(10, np.float32), 16000, "", "en")])
    assert laughter.seen["cer"][0].info == {"from": "cer"} and set(results) == {"cer", "laughter"}
    with pytest.raises(ValueError, match="requires 'cer', which is not configured"):
        dependency_order([laughter])
    with pytest.raises(ValueError, match="cycle"):
        dependency_order([Recorder("a", ("b",)), Recorder("b", ("a",))])


class MeetsTheOther:
    """Test double: scores only once the other plugin is scoring at the same time (a barrier of two)."""

    def __init__(self, name, barrier):
        self.name, self.barrier = name, barrier

    def score(self, samples):
        self.barrier.wait(timeout=10)  # raises BrokenBarrierError if the plugins ran one after the other
        return [RewardResult(0.5) for _ in samples]


class ReturnsTooFew:
    name = "short"

    def score(self, samples):
        return []


def test_independent_rewards_score_side_by_side_and_errors_still_surface():
    barrier = threading.Barrier(2)
    samples = [Sample(np.zeros(10, np.float32), 16000, "", "en")] * 3
    results = score_all([MeetsTheOther("cer", barrier), MeetsTheOther("sim", barrier)], samples)
    assert {name: [r.value for r in out] for name, out in results.items()} == {"cer": [0.5] * 3, "sim": [0.5] * 3}
    with pytest.raises(RuntimeError, match="reward 'short' returned 0 results for 3 samples"):
        score_all([Recorder("cer"), ReturnsTooFew()], samples)


def test_an_unknown_backend_kind_reads_the_same_for_every_plugin():
    from vocalign.rewards.asr import build_asr
    from vocalign.rewards.emotion import EmotionReward
    from vocalign.rewards.similarity import build_speaker_encoder

    with pytest.raises(ValueError, match=r"unknown ASR kind 'kaldi'; known: \['paraformer', 'pocketsphinx', 'whisper'\]"):
        build_asr("kaldi")
    with pytest.raises(ValueError, match=r"unknown speaker encoder kind 'ivector'; known: \['ecapa_wavlm', 'resemblyzer'"):
        build_speaker_encoder("ivector")
    with pytest.raises(ValueError, match=r"unknown emotion classifier kind 'svm'; known: \['audio_classifier', 'emotion2vec'\]"):
        EmotionReward({"kind": "svm"})
