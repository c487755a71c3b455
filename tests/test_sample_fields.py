"""Per-utterance fields a plugin declares (``sample_fields``): from a prompt file's column to the plugin, in-process
and through a reward server on loopback, with undeclared, missing and malformed fields refused saying which."""

import json
import urllib.request

import msgpack
import numpy as np
import pytest
import soundfile as sf

from vocalign.common.generation import SamplingParams
from vocalign.policies.checkpoints import write_tiny_checkpoint
from vocalign.policies.pipeline import TTSPipeline
from vocalign.rewards.base import RewardResult, Sample, score_all
from vocalign.rewards.client import RemoteReward, RewardRequestError
from vocalign.rewards.scorer import RewardScorer
from vocalign.rewards.wire import JSON, MAX_FIELD_CHARS, WireError, encode, request_payload, sample_from_wire
from vocalign.rlhf.tts_env import TTSEnv, load_prompt_rows, row_fields

from .test_reward_server import post, start_server

PLUGIN = '''
from vocalign.rewards.base import RewardResult


class FakePitchReward:
    """Test double: a reward for reaching each utterance's target pitch, here how far 200 Hz is from it."""

    name = "pitch"
    sample_fields = {"target_pitch": float}

    def score(self, samples):
        return [RewardResult(-abs(s.fields["target_pitch"] - 200.0) / 100.0, {"seen": sorted(s.fields)})
                for s in samples]
'''
namespace: dict = {}
exec(PLUGIN, namespace)  # the same class in-process as the server imports from a file
FakePitchReward = namespace["FakePitchReward"]


class FakeFieldRecorder:
    """Test double: declares nothing and records the fields it was handed."""

    name = "recorder"

    def __init__(self):
        self.seen = []

    def score(self, samples):
        self.seen += [dict(s.fields) for s in samples]
        return [RewardResult(0.0) for _ in samples]


def utterance(**fields):
    return Sample(np.full(1600, 0.1, np.float32), 16000, "hello", "en", fields=fields)


def test_a_plugin_gets_the_fields_it_declares_and_no_other_gets_them():
    recorder = FakeFieldRecorder()
    samples = [utterance(target_pitch=220, voice="m1"), utterance(target_pitch=150.5, voice="f2")]
    results = score_all([FakePitchReward(), recorder], samples)
    assert [r.value for r in results["pitch"]] == pytest.approx([-0.2, -0.495])
    assert [r.info["seen"] for r in results["pitch"]] == [["target_pitch"], ["target_pitch"]]  # not `voice`
    assert recorder.seen == [{}, {}]
    with pytest.raises(ValueError, match=r"sample 1: reward 'pitch' needs field\(s\) \['target_pitch'\]"):
        score_all([FakePitchReward()], [utterance(target_pitch=1.0), utterance(voice="m1")])
    for bad in ("high", float("nan"), True):
        with pytest.raises(ValueError, match="field 'target_pitch' must be"):
            score_all([FakePitchReward()], [utterance(target_pitch=bad)])


def write_prompts(tmp_path, rows):
    sf.write(tmp_path / "voice.wav", np.zeros(8000, np.float32), 16000)
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"text": "hi", "language": "en", "prompt_wav": "voice.wav",
                                        "prompt_text": "hello", **row}) + "\n" for row in rows))
    return path


def test_a_column_no_plugin_declares_is_refused_when_the_prompts_load(tmp_path):
    typo = write_prompts(tmp_path, [{"target_pich": 220.0}])
    with pytest.raises(ValueError, match=r"column\(s\) \['target_pich'\] are read by no reward plugin; .* the "
                                         r"rewards declare the fields \{pitch: target_pitch \(float\); recorder: "
                                         r"none\}"):
        load_prompt_rows(typo, [FakePitchReward(), FakeFieldRecorder()])
    assert load_prompt_rows(typo)[0]["target_pich"] == 220.0  # without the plugins there is nothing to check against
    good = write_prompts(tmp_path, [{"target_pitch": 220, "voice": "m1"}, {"target_pitch": 180.5, "voice": "f2"}])
    rows = load_prompt_rows(good, [FakePitchReward()])  # `voice` describes the row: not refused
    # what the environment puts in each sample's extras, and the sample the scorer makes of them
    extras = {"audio": np.full(1600, 0.1, np.float32), "sample_rate": 16000, "text": "hi", "language": "en",
              "fields": row_fields(rows[1]), "token_rate_hz": 25.0}
    assert row_fields(rows[1]) == {"target_pitch": 180.5, "voice": "f2"}
    assert score_all([FakePitchReward()], [Sample.from_mapping(extras)])["pitch"][0].value == pytest.approx(-0.195)
    missing = write_prompts(tmp_path, [{"target_pitch": 220.0}, {}])
    with pytest.raises(ValueError, match="row 1: no value in column 'target_pitch'"):
        load_prompt_rows(missing, [FakePitchReward()])
    wrong = write_prompts(tmp_path, [{"target_pitch": "high"}])
    with pytest.raises(ValueError, match="row 0: field 'target_pitch' must be float, got 'high'"):
        load_prompt_rows(wrong, [FakePitchReward()])


def test_fields_on_the_wire_are_strings_integers_or_finite_numbers_of_bounded_size():
    item = msgpack.unpackb(msgpack.packb(request_payload([utterance(speaker="s1", take=3, target_pitch=1.5)])))
    assert sample_from_wire(item["samples"][0], 0).fields == {"speaker": "s1", "take": 3, "target_pitch": 1.5}
    for fields, message in [({"speaker": "x" * (MAX_FIELD_CHARS + 1)}, "has 1001 characters"),
                            ({"pitch": float("inf")}, "must be a finite number"),
                            ({"flag": True}, "must be float"), ({"nested": [1.0]}, "must be float"),
                            ({"": 1.0}, "a field name must be a string of 1 to 64"),
                            ({f"f{k}": 1.0 for k in range(33)}, "at most 32 named values")]:
        raw = request_payload([utterance()])["samples"][0]
        with pytest.raises(WireError, match=message):
            sample_from_wire({**raw, "fields": fields}, 0)


@pytest.mark.slow
def test_the_tts_environment_hands_each_rows_fields_to_the_plugin_scoring_its_samples(tmp_path):
    pipeline = TTSPipeline.from_pretrained(write_tiny_checkpoint(tmp_path / "ckpt"))
    path = write_prompts(tmp_path, [{"target_pitch": 220.0, "voice": "m1"}, {"target_pitch": 150.0, "voice": "f2"}])
    plugin = FakePitchReward()
    rows = load_prompt_rows(path, [plugin])
    rollouts = TTSEnv(pipeline).rollout(pipeline.lm.model, rows, 2, SamplingParams(max_new_tokens=8))
    scores = RewardScorer([plugin]).score(rollouts)
    assert scores.rewards["pitch"] == pytest.approx([-0.2, -0.2, -0.5, -0.5])  # each sample its own row's target
    assert [e["scores"]["pitch"].info["seen"] for e in rollouts.extras] == [["target_pitch"]] * 4


@pytest.mark.slow
def test_a_declared_field_travels_through_a_reward_server(tmp_path):
    (tmp_path / "pitchy.py").write_text(PLUGIN)
    (tmp_path / "pitch.yaml").write_text("target: pitchy:FakePitchReward\n")
    proc, url = start_server("--config", str(tmp_path / "pitch.yaml"), name="pitch", path=str(tmp_path))
    try:
        info = json.loads(urllib.request.urlopen(f"{url}/info", timeout=5).read())
        assert info["sample_fields"] == {"target_pitch": "float"} and info["roles"] == {}
        remote = RemoteReward("pitch", [url], sample_fields={"target_pitch": "float"}, retries=0)
        samples = [utterance(target_pitch=220, voice="m1"), utterance(target_pitch=150.5)]
        served, local = score_all([remote], samples)["pitch"], score_all([FakePitchReward()], samples)["pitch"]
        assert [r.value for r in served] == [r.value for r in local] == pytest.approx([-0.2, -0.495])
        assert [r.info for r in served] == [{"seen": ["target_pitch"]}] * 2
        # a client that sends a field the plugin does not declare, or leaves out one it does, is told which
        status, reply = post(url, encode(request_payload([utterance(target_pitch=1.0, target_pich=2.0)]), JSON))
        assert status == 400 and reply["error"] == ("sample 0: field(s) ['target_pich'] are not declared by reward "
                                                    "'pitch', which declares: target_pitch (float)")
        undeclared = RemoteReward("pitch", [url], retries=0)  # not registered: declares nothing, sends nothing
        with pytest.raises(RewardRequestError, match=r"needs field\(s\) \['target_pitch'\]"):
            score_all([undeclared], samples[1:])
    finally:
        proc.kill()
        proc.wait()


def test_a_remote_reward_declares_what_the_plugin_registered_under_its_name_does():
    cer = RemoteReward("cer", ["http://127.0.0.1:9"])
    assert cer.roles == {"error_rate": "cer"} and cer.sample_fields == {}
    sim = RemoteReward("sim", ["http://127.0.0.1:9"], roles={})  # the config can say otherwise
    assert sim.roles == {} and RemoteReward("sim", ["http://127.0.0.1:9"]).roles == {"similarity": "cosine"}
    with pytest.raises(ValueError, match="sample field 'target' has type 'complex'"):
        RemoteReward("x", ["http://127.0.0.1:9"], sample_fields={"target": "complex"})
    with pytest.raises(ValueError, match=r"unknown role\(s\) \['loudness'\]"):
        RemoteReward("x", ["http://127.0.0.1:9"], roles={"loudness": "db"})
