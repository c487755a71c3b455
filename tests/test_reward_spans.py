"""Time-localised scores (spans): validated like the scalar, and carried both ways through the wire format and a
real reward server on 127.0.0.1."""

import math
import re

import numpy as np
import pytest

from vocalign.rewards.base import RewardResult, Sample, check_spans, score_all
from vocalign.rewards.client import RewardClient
from vocalign.rewards.wire import (
    JSON,
    MSGPACK,
    WireError,
    decode,
    encode,
    request_payload,
    results_from_wire,
    results_to_wire,
    upstream_from_wire,
)


class FakeSpanReward:
    """Test double: value 0.5 and, per sample, the spans given for its text (none for an unknown text)."""

    name = "fake_spans"

    def __init__(self, spans_by_text):
        self.spans_by_text = spans_by_text

    def score(self, samples):
        return [RewardResult(0.5, {"text": s.text}, spans=list(self.spans_by_text.get(s.text, []))) for s in samples]


def one_second(text="a"):
    return Sample(np.full(16000, 0.1, np.float32), 16000, text, "en")


@pytest.mark.parametrize("spans, message", [
    ([(0.2, float("nan"), -1.0)], "span 0 must be three finite numbers"),
    ([(0.2, 0.4)], "span 0 must be three finite numbers"),
    ([(0.4, 0.4, -1.0)], r"needs 0 <= start_s < end_s"),
    ([(-0.1, 0.4, -1.0)], r"needs 0 <= start_s < end_s"),
    ([(0.5, 1.2, -1.0)], r"ends after the audio \(1.000 s\)"),
    ([(0.5, 0.8, -1.0), (0.1, 0.3, -1.0)], "span 1 .* starts before span 0 ends"),
    ([(0.1, 0.5, -1.0), (0.4, 0.8, -1.0)], "must not overlap"),
])
def test_bad_spans_fail_their_sample_naming_the_reward_and_the_sample(spans, message):
    """A reward that says *where* wrongly cannot be trusted on that sample: failed (masked), not fatal."""
    plugin = FakeSpanReward({"bad": spans})
    good, bad = score_all([plugin], [one_second(), one_second("bad")])["fake_spans"]
    assert good.status == "ok" and bad.status == "failed" and math.isnan(bad.value)
    assert re.search(f"reward 'fake_spans', sample 1: .*{message}", bad.reason)


def test_good_spans_pass_and_results_without_spans_are_unchanged():
    check_spans([(0.0, 0.3, -1.0), (0.3, 0.6, 0.0), (0.9, 1.03, -1.0)], 1.0, "x")  # 30 ms past the end: tolerated
    spans = [(0.1, 0.4, -1.0)]
    out = score_all([FakeSpanReward({"a": spans})], [one_second(), one_second("b")])["fake_spans"]
    assert out[0].spans == spans and out[1].spans == []
    assert RewardResult(1.0).spans == []


@pytest.mark.parametrize("content_type", [JSON, MSGPACK])
def test_spans_round_trip_through_the_wire_functions(content_type):
    results = [RewardResult(0.25, {"transcript": "one two"}, spans=[(0.1, 0.42, -1.0), (0.5, 0.9, 0.0)]),
               RewardResult(1.0, {})]
    wire = results_to_wire(results)
    assert "spans" not in wire[1]  # a reply without spans reads as before
    back = results_from_wire(decode(encode({"results": wire}, content_type), content_type)["results"], 2, "reply")
    assert [r.spans for r in back] == [[(0.1, 0.42, -1.0), (0.5, 0.9, 0.0)], []]
    assert [r.value for r in back] == [0.25, 1.0]
    # upstream results (a laughter reward behind a server that reuses the CER's) carry them too
    payload = decode(encode(request_payload([one_second()], {"cer": results[:1]}), content_type), content_type)
    assert upstream_from_wire(payload["upstream"], 1)["cer"][0].spans == results[0].spans


@pytest.mark.parametrize("spans, message", [
    ("0.1-0.4", "'spans' must be a list of"),
    ([[0.1, 0.4, "bad"]], "span 0 must be three finite numbers"),
    ([[0.5, 0.9, -1.0], [0.1, 0.4, -1.0]], "span 1 .* starts before span 0 ends"),
])
def test_a_reply_with_malformed_spans_is_a_wire_error_saying_where(spans, message):
    with pytest.raises(WireError, match=f"reply: result 0: {message}"):
        results_from_wire([{"value": 1.0, "info": {}, "spans": spans}], 1, "reply")


def test_a_remote_reward_sends_its_spans_to_the_client(local_server):
    spans = {"one two": [(0.12, 0.36, -1.0), (0.6, 0.84, 0.0)], "three": [(0.0, 0.2, -1.0)]}
    _, url = local_server(FakeSpanReward(spans))
    client = RewardClient([url])
    try:
        out = client.score([one_second("one two"), one_second("none"), one_second("three")])
    finally:
        client.close()
    assert [r.spans for r in out] == [spans["one two"], [], spans["three"]]
    assert [r.info["text"] for r in out] == ["one two", "none", "three"]
