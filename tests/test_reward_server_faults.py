"""Reward server and client under faults, in one process on 127.0.0.1: bad samples, bad replies, malformed requests,
stalled uploads, abandoned and oversized work, fairness between requests, bounded bookkeeping, connection reuse."""

import asyncio
import json
import re
import socket
import threading
import time
import urllib.error
import urllib.request

import msgpack
import numpy as np
import pytest
from aiohttp import web

from vocalign.rewards.base import RewardResult, Sample, min_value, screen
from vocalign.rewards.client import RewardClient, RewardRequestError, RewardServerError
from vocalign.rewards.energy import EnergyReward
from vocalign.rewards.limits import ServerLimits
from vocalign.rewards.scorer import build_plugin
from vocalign.rewards.server import RewardServer
from vocalign.rewards.wire import JSON, encode, request_payload


class FakeReward:
    """Value = the first audio sample; a 'fr' sample raises ValueError (like the CER reward without a French ASR),
    text 'boom' raises RuntimeError; each model call sleeps ``seconds_per_sample`` per sample it scores."""

    name = "fake"

    def __init__(self, seconds_per_sample: float = 0.0) -> None:
        self.seconds_per_sample = seconds_per_sample
        self.scored: list[str] = []  # the text of every sample scored, in order

    def score(self, samples):
        for s in samples:
            if s.language == "fr":
                raise ValueError("no ASR configured for language 'fr'")
            if s.text == "boom":
                raise RuntimeError("the model blew up")
        time.sleep(self.seconds_per_sample * len(samples))
        self.scored.extend(s.text for s in samples)
        return [RewardResult(float(s.audio[0]), {"text": s.text}) for s in samples]


def sample(level=0.1, text="", language="en", n=1600):
    return Sample(np.full(n, level, np.float32), 16000, text, language)


@pytest.fixture
def clients():
    """RewardClients that are closed after the test."""
    made = []

    def make(urls, **settings):
        made.append(RewardClient(urls, **settings))
        return made[-1]

    yield make
    for client in made:
        client.close()


def post(url, body, content_type="application/json", timeout=10):
    request = urllib.request.Request(f"{url}/score", data=body,
                                     headers={"Content-Type": content_type, "Accept": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def get_json(url):
    return json.loads(urllib.request.urlopen(url, timeout=5).read())


# ---------------------------------------------------------------- finding 1: a bad sample costs itself only
def test_a_sample_the_plugin_cannot_score_fails_alone_and_the_call_gets_every_other_result(local_server, clients):
    plugin = FakeReward()
    server, url = local_server(plugin, max_batch=16, max_wait_ms=300)  # both requests land in one batch
    good, bad = clients([url], retries=3, backoff_s=0.01), clients([url], retries=3, backoff_s=0.01)

    async def together():
        return await asyncio.gather(good.score_async([sample(0.1, "a"), sample(0.2, "b")]),
                                    bad.score_async([sample(0.3, "c"), sample(0.4, "d", "fr"), sample(0.5, "e"),
                                                     sample(0.6, "boom")]))

    ok, mixed = asyncio.run(together())
    assert [r.value for r in ok] == pytest.approx([0.1, 0.2]) and {r.status for r in ok} == {"ok"}
    assert [r.status for r in mixed] == ["ok", "failed", "ok", "failed"]
    assert [mixed[0].value, mixed[2].value] == pytest.approx([0.3, 0.5])
    assert np.isnan(mixed[1].value) and mixed[1].reason == "ValueError: no ASR configured for language 'fr'"
    assert mixed[3].reason == "RuntimeError: the model blew up"
    assert bad.stats.failed_attempts == 0 and server.requests == 2  # answered once, nothing retried
    assert max(server.batch_sizes) == 6  # the two requests did share a model call
    assert sorted(plugin.scored) == ["a", "b", "c", "e"]


# ---------------------------------------------------------------- finding 3: the client checks every reply
@pytest.mark.parametrize("reply, reason", [
    (lambda: web.json_response({"results": [{"value": 1.0}] * 2}), "one result per sample (3), got 2 results"),
    (lambda: web.json_response({"results": [{"value": 1.0}, {"value": float("nan")}, {"value": 1.0}]}),
     "finite number"),
    (lambda: web.json_response({"results": [{"value": "1"}] * 3}), "finite number"),
    (lambda: web.Response(text="<html>hello</html>", content_type="text/html"), "Content-Type 'text/html'"),
    (lambda: web.Response(status=502, text="<html>bad gateway</html>", content_type="text/html"), "HTTP 502"),
    (lambda: web.Response(body=b"\xc1", content_type="application/msgpack"), "not valid msgpack"),
    (lambda: web.Response(text='{"results": [{"value": 1' + "0" * 400 + '}, {"value": 1}, {"value": 1}]}',
                          content_type="application/json"), "finite number"),
    (lambda: web.Response(body=b"[" + b" " * 3 * 2**20 + b"]", content_type="application/json"),
     "reply of 3145730 bytes; at most 1245184 expected"),
    (lambda: web.Response(status=307, headers={"Location": "/score2"}), "redirects are not followed"),
], ids=["count", "nan", "string", "html", "502", "garbage", "huge-int", "huge-reply", "redirect"])
def test_the_client_rejects_a_malformed_reply_and_fails_over(local_server, clients, reply, reason):
    async def handler(request):
        await request.read()
        return reply()

    redirected = []

    async def redirect_target(request):
        redirected.append(await request.read())
        return web.json_response({"results": [{"value": 1.0}] * 3})

    app = web.Application()
    app.router.add_post("/score", handler)
    app.router.add_post("/score2", redirect_target)
    _, broken = local_server(app)
    with pytest.raises(RewardServerError, match="no reward server could score") as err:
        clients([broken], retries=0).score([sample()] * 3)
    assert reason in str(err.value) and broken in str(err.value)
    _, good = local_server(EnergyReward())
    client = clients([broken, good], retries=1, backoff_s=0.01)
    assert len(client.score([sample()] * 3)) == 3
    assert client.stats.failures_by_url == {broken: 1} and redirected == []  # audio never re-posted elsewhere


# ---------------------------------------------------------------- finding 4: bounded and fair
def test_a_small_request_is_not_held_back_by_a_large_one(local_server, clients):
    # 16 one-second samples take 1.6 s of model time; with two samples per model call, the small request waits for
    # one call (0.2 s), not for the whole large request
    _, url = local_server(FakeReward(seconds_per_sample=0.1), max_batch=4, max_batch_audio_s=2.0)
    big_client, small_client = clients([url], retries=0), clients([url], retries=0)
    done = {}

    async def timed(name, client, samples, delay):
        await asyncio.sleep(delay)
        t0 = time.monotonic()
        await client.score_async(samples)
        done[name] = (t0, time.monotonic())

    async def both():
        await asyncio.gather(timed("big", big_client, [sample(0.1, "big", n=16000)] * 16, 0.0),
                             timed("small", small_client, [sample(0.2, "small")], 0.1))

    asyncio.run(both())
    small, big = done["small"][1] - done["small"][0], done["big"][1] - done["big"][0]
    assert big > 1.5 and small < 0.6  # interleaved (about 0.3 s), not queued behind the large request (1.5 s)
    assert done["small"][1] < done["big"][1]


def test_work_of_a_client_that_gave_up_is_dropped_not_scored(local_server, clients):
    plugin = FakeReward(seconds_per_sample=0.1)
    _, url = local_server(plugin, max_batch=2)
    with pytest.raises(RewardServerError, match="no answer within 0.35 s"):
        clients([url], retries=0, timeout_s=0.35).score([sample(0.1, "gone")] * 20)
    t0 = time.monotonic()
    assert clients([url], retries=0).score([sample(0.2, "next")])[0].value == pytest.approx(0.2)
    assert time.monotonic() - t0 < 1.0
    time.sleep(1.0)  # 20 samples would take 2 s: give the rest time to be (wrongly) scored
    assert plugin.scored.count("gone") <= 8 and plugin.scored.count("next") == 1


def test_a_full_queue_answers_503_at_once_and_the_client_goes_elsewhere(local_server, clients):
    _, busy = local_server(FakeReward(seconds_per_sample=0.2), max_batch=1, max_queued_samples=4,
                           max_samples_per_request=4)
    _, idle = local_server(EnergyReward())
    first = threading.Thread(target=lambda: clients([busy], retries=0).score([sample()] * 4))
    first.start()
    while get_json(f"{busy}/info")["queued_samples"] < 3:
        time.sleep(0.01)
    t0 = time.monotonic()
    status, body = post(busy, encode(request_payload([sample()] * 2), JSON))
    assert status == 503 and re.search(r"server busy: [34] samples queued \(limit 4\)", body["error"])
    client = clients([busy, idle], retries=1, backoff_s=0.01)
    assert len(client.score([sample()] * 2)) == 2
    assert time.monotonic() - t0 < 0.3  # refused at once, not queued behind the busy server's work
    assert client.stats.busy_answers == 1 and client.stats.failures_by_url == {}  # busy is not failed
    first.join()


def test_text_length_is_capped_per_sample(local_server, clients):
    _, url = local_server(EnergyReward(), max_text_chars=100)
    results = clients([url], retries=0).score([sample(text="x" * 100), sample(text="x" * 101)])
    assert [r.status for r in results] == ["ok", "failed"]
    assert results[1].reason == "sample 1 text has 101 characters; the limit is 100"


def test_a_stalled_upload_times_out_and_the_server_stays_responsive(local_server, clients):
    _, url = local_server(EnergyReward(), body_timeout_s=0.5)
    port = int(url.rsplit(":", 1)[1])
    stalled = []
    for _ in range(20):
        sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        sock.sendall(b"POST /score HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 100000\r\n\r\n{\"samples\": [")
        stalled.append(sock)
    t0 = time.monotonic()
    assert len(clients([url], retries=0).score([sample()])) == 1  # served meanwhile
    answers = [sock.recv(200).split(b"\r\n")[0] for sock in stalled]
    assert all(b" 408 " in a for a in answers), answers[:3]
    assert time.monotonic() - t0 < 3.0
    for sock in stalled:
        sock.close()


# ---------------------------------------------------------------- finding 5: malformed requests get 400, never 500
def test_malformed_requests_get_400_with_a_reason(local_server):
    server, url = local_server(EnergyReward())
    audio = "AAAAAA=="  # two f32 samples, base64

    def one(**fields):
        return {"samples": [{"audio": audio, "sample_rate": 16000, "text": "", "language": "en", **fields}]}

    cases = [
        (one(encoding=["f32"]), "encoding must be one of"),
        (one(encoding=5), "encoding must be one of"),
        (one(prompt_audio=audio, prompt_sample_rate=16000, prompt_encoding={"a": 1}), "encoding must be one of"),
        (one(prompt_audio=audio, prompt_sample_rate="16000"), "integer prompt_sample_rate"),
        (one(sample_rate=True), "'sample_rate' must be an integer"),
        (one(text=["a"]), "'text' must be a string"),
        (one(emotion=3), "'emotion' must be a string"),
        ({**one(), "upstream": {"cer": [1.0]}}, "finite number 'value'"),
        ({**one(), "upstream": {"cer": [{"info": {}}]}}, "finite number 'value'"),
        ({**one(), "upstream": {"cer": [{"value": "x"}]}}, "finite number 'value'"),
        ({**one(), "upstream": {"cer": [{"value": 1.0, "info": [1]}]}}, "'info' must be an object"),
        ({**one(), "upstream": {"cer": [{"value": 1.0}] * 2}}, "one result per sample (1), got 2 results"),
        ({**one(), "upstream": {"cer": "x"}}, "one result per sample (1), got str"),
        ({**one(), "upstream": [1]}, "upstream must map reward names"),
        ({**one(), "upstream": {"cer": [{"value": 10**400}]}}, "finite number 'value'"),
        (one(language="x" * 65), "field 'language' has 65 characters; a label has at most 64"),
        (one(emotion="x" * 20_000), "field 'emotion' has 20000 characters"),
        ({**one(), "deadline_s": "soon"}, "'deadline_s' must be a number of seconds > 0"),
        ({**one(), "deadline_s": 0}, "'deadline_s' must be a number of seconds > 0"),
    ]
    for payload, reason in cases:
        status, body = post(url, json.dumps(payload).encode())
        assert status == 400 and reason in body["error"], (payload, status, body)
    status, body = post(url, b"[" * 200_000)
    assert status == 400 and "nested too deeply" in body["error"]
    status, body = post(url, b"\x91" * 200_000 + b"\xc0", "application/msgpack")
    assert status == 400 and "not valid msgpack" in body["error"]
    status, body = post(url, msgpack.packb(one(encoding=["f32"])), "application/msgpack")
    assert status == 400 and "encoding must be one of" in body["error"]
    request = urllib.request.Request(f"{url}/score", data=json.dumps(one()).encode(),
                                     headers={"Content-Type": "application/json", "Content-Encoding": "gzip"})
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=10)
    assert refused.value.code == 400 and "does not match its Content-Encoding 'gzip'" in refused.value.read().decode()
    assert get_json(f"{url}/health") == {"status": "ok"} and server.requests == 0


# ---------------------------------------------------------------- finding 7: bounded counts, one session per client
def test_info_counts_every_batch_in_a_bounded_histogram(local_server, clients):
    server, url = local_server(EnergyReward(), max_batch=1, max_wait_ms=0, max_queued_samples=20_000)
    client = clients([url], retries=0, max_samples_per_request=256)
    client.score([sample(n=16)] * 10_240)  # 40 requests of 256, one model call per sample
    info = get_json(f"{url}/info")
    assert info["batches"] == 10_240 and info["batch_size_histogram"] == {"1": 10_240}
    assert info["requests"] == 40 and info["max_batch_size_seen"] == 1 and info["mean_batch_size"] == 1.0
    assert len(server.batch_sizes) <= server.limits.max_batch


def test_a_client_reuses_one_connection_across_calls_and_event_loops(local_server, clients):
    peers = []

    @web.middleware
    async def record_peer(request, handler):
        peers.append(request.transport.get_extra_info("peername")[1])
        return await handler(request)

    app = RewardServer(EnergyReward()).app()
    app.middlewares.append(record_peer)
    _, url = local_server(app)
    client = clients([url], retries=0)
    for _ in range(3):
        client.score([sample()])
    for _ in range(2):  # a fresh event loop each time, as asyncio.run in a caller does
        asyncio.run(client.score_async([sample()]))
    assert len(peers) == 5 and len(set(peers)) == 1


# ---------------------------------------------------------------- issue 26: delivering under overload
def test_under_overload_most_calls_complete_within_their_deadline(local_server, clients):
    # the scenario, 4x faster: 10 calls x 64 samples at 400 samples/s is 1.6 s of work for a 1.25 s
    # timeout; served a sample of each in turn, every call would miss it together (1 of 10 did)
    server, url = local_server(FakeReward(seconds_per_sample=1 / 400), max_batch=32)
    callers = [clients([url], retries=0, timeout_s=1.25) for _ in range(10)]

    async def all_calls():
        return await asyncio.gather(*(c.score_async([sample(0.1, str(k))] * 64) for k, c in enumerate(callers)))

    calls = asyncio.run(all_calls())  # every call is answered, none raises
    complete = [all(r.status == "ok" for r in call) for call in calls]
    assert sum(complete) >= 6, complete
    late = {r.reason for call in calls for r in call if r.status != "ok"}
    assert late == {"not started before the request's deadline"} and server.expired_samples > 0


def test_a_busy_server_is_waited_for_honouring_retry_after_not_counted_as_failed(local_server, clients):
    _, url = local_server(FakeReward(seconds_per_sample=0.1), max_batch=4, max_queued_samples=8,
                          max_samples_per_request=8)
    first, patient, hasty = (clients([url], retries=0), clients([url], retries=0, timeout_s=5),
                             clients([url], retries=0, timeout_s=0.5))

    async def queue_full_then(client):
        ahead = asyncio.ensure_future(first.score_async([sample()] * 8))  # 0.8 s of work: the queue is full
        await asyncio.sleep(0.15)
        t0 = time.monotonic()
        try:
            return await client.score_async([sample()] * 8), time.monotonic() - t0
        finally:
            await ahead

    results, waited = asyncio.run(queue_full_then(patient))
    assert [r.status for r in results] == ["ok"] * 8
    assert patient.stats.busy_answers >= 1 and patient.stats.failed_attempts == 0
    assert waited >= 1.0  # asked again after Retry-After (whole seconds), not at once
    with pytest.raises(RewardServerError, match="busy \\(HTTP 503: server busy"):  # not free within its timeout
        asyncio.run(queue_full_then(hasty))
    assert hasty.stats.failed_attempts == 0


def test_a_chunk_no_server_answers_fails_its_own_samples_and_the_others_are_delivered(local_server, clients):
    _, good = local_server(EnergyReward())
    dead = f"http://127.0.0.1:{free_port()}"
    results = clients([good, dead], retries=0, max_samples_per_request=2).score([sample(0.1)] * 4)
    assert [r.status for r in results] == ["ok", "ok", "failed", "failed"]  # chunk 1 began at the dead server
    assert results[2].reason.startswith("no reward server could score 2 samples (1 attempts in ") and dead in \
        results[2].reason


def test_a_callers_bug_in_one_chunk_cancels_its_siblings_on_the_server(local_server, clients):
    plugin = FakeReward(seconds_per_sample=0.1)
    _, url = local_server(plugin, max_batch=1, max_request_mb=0.1, max_inflight_mb=1)
    small, large = [sample(0.1, "sibling")] * 8, [sample(0.1, "large", n=16000)] * 8  # 8 x 64 KB > 0.1 MB: 413
    with pytest.raises(RewardRequestError, match="\\(413\\): request body exceeds"):
        clients([url], retries=0, max_samples_per_request=8).score(small + large)
    time.sleep(1.0)  # the sibling's 8 samples take 0.8 s: give them time to be (wrongly) scored
    assert plugin.scored.count("sibling") <= 2


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("entry, message", [
    ({"urls": "http://127.0.0.1:8100"}, "urls must be a list of server URLs"),
    ({"urls": ["ftp://127.0.0.1:8100"]}, "'ftp://127.0.0.1:8100' is not an http:// or https:// server URL"),
    ({"urls": ["127.0.0.1:8100"]}, "is not an http:// or https:// server URL"),
    ({"urls": ["http://127.0.0.1:8100"], "timeout": 5}, "unknown key(s) in remote reward 'cer': 'timeout' (did you mean 'timeout_s'?)"),
    ({"urls": ["http://127.0.0.1:8100"], "retries": "3"}, "remote reward 'cer'.retries must be an integer, got '3'"),
    ({"urls": ["http://127.0.0.1:8100"], "min_value": "low"}, "min_value must be a finite number"),
], ids=["string", "ftp", "no-scheme", "typo", "type", "min-value"])
def test_remote_reward_entries_are_checked_when_the_recipe_loads(entry, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        build_plugin({"name": "cer", **entry})


def test_a_remote_reward_says_its_min_value():
    assert build_plugin({"name": "cer", "urls": ["http://127.0.0.1:8100"], "min_value": -1}).min_value == -1.0
    assert build_plugin({"name": "cer", "urls": ["http://127.0.0.1:8100"]}).min_value == 0.0


class FakeCPUASR:
    """Takes ``seconds_per_audio_s`` per second of audio in a call, like a CPU ASR (pocketsphinx: up to 2 s)."""

    name = "cer"

    def __init__(self, seconds_per_audio_s):
        self.seconds_per_audio_s = seconds_per_audio_s

    def score(self, samples):
        time.sleep(self.seconds_per_audio_s * sum(s.audio.size / s.sample_rate for s in samples))
        return [RewardResult(0.0) for _ in samples]


def test_with_the_cer_defaults_a_small_request_behind_long_ones_waits_one_short_call(local_server, clients):
    # 100x faster than pocketsphinx at its slowest. Bound: the call in flight holds at most max_audio_seconds (one
    # utterance) and the small request's own call max_batch_audio_s: (20 + 5) s x 0.02 = 0.5 s. With the general
    # defaults the four 20 s utterances are one 80 s call (1.6 s) and the small request waits behind it.
    limits = ServerLimits.for_plugin("cer")
    assert (limits.max_batch_audio_s, limits.max_audio_seconds) == (5.0, 20.0)
    _, url = local_server(FakeCPUASR(0.02), **{k: getattr(limits, k) for k in ("max_batch_audio_s", "max_audio_seconds")})
    long_client, small_client = clients([url], retries=0), clients([url], retries=0)
    waited = {}

    async def timed(name, client, samples, delay):
        await asyncio.sleep(delay)
        t0 = time.monotonic()
        await client.score_async(samples)
        waited[name] = time.monotonic() - t0

    async def both():
        await asyncio.gather(timed("long", long_client, [sample(n=16000 * 20)] * 4, 0.0),
                             timed("small", small_client, [sample(n=16000)], 0.05))

    asyncio.run(both())
    assert waited["small"] < 0.5 + 0.2 < waited["long"]


def test_idle_uploads_do_not_hold_the_byte_budget(local_server, clients):
    # four connections declare the largest body and together the whole budget; they send nothing, then a few bytes
    _, url = local_server(EnergyReward(), max_request_mb=1, max_inflight_mb=4, upload_idle_s=0.3, body_timeout_s=20)
    port = int(url.rsplit(":", 1)[1])
    header = (b"POST /score HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
              b"Content-Length: %d\r\n\r\n" % 2**20)
    idle = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(4)]
    for sock in idle:
        sock.sendall(header)  # declared, nothing sent: no room is taken
    client = clients([url], retries=0, timeout_s=10)
    t0 = time.monotonic()
    assert client.score([sample()])[0].status == "ok"
    assert time.monotonic() - t0 < 0.25
    for sock in idle:
        sock.sendall(b'{"samples": [')  # room taken, then a pause: cut after upload_idle_s
    time.sleep(0.05)
    t0 = time.monotonic()
    assert client.score([sample()])[0].status == "ok"
    assert time.monotonic() - t0 < 0.3 + 0.25  # not the 20 s body timeout
    assert all(b" 408 " in sock.recv(200).split(b"\r\n")[0] for sock in idle)
    for sock in idle:
        sock.close()


def test_a_server_gives_a_sample_the_status_in_process_scoring_gives_it(local_server, clients):
    """NaN audio is the synthesis pipeline's fault (failed, masked), empty or over-long audio the policy's (invalid,
    at the minimum): the same verdict from a server as from rewards.base.screen, so training treats them alike."""
    _, url = local_server(EnergyReward())
    samples = [sample(0.1), Sample(np.full(1600, np.nan, np.float32), 16000, "", "en"),
               Sample(np.array([0.1, np.inf], np.float32), 16000, "", "en"), Sample(np.zeros(0, np.float32), 16000, "", "en"),
               Sample(np.zeros(8000 * 61, np.float32), 8000, "", "en")]
    results = clients([url], retries=0).score(samples)
    assert [r.status for r in results] == ["ok", "failed", "failed", "invalid", "invalid"]
    assert [(r.status, r.reason) for r in results[1:]] == [(v.status, v.reason) for v in map(screen, samples[1:])]
    assert np.isnan(results[1].value) and np.isnan(results[2].value)
    assert [r.value for r in results[3:]] == [min_value(EnergyReward())] * 2
