"""Reward servers as real processes on loopback: batching, order, fail-over (killed and hung servers), limits,
bounded memory, and the serve-reward command's refusals."""

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import aiohttp
import numpy as np
import psutil
import pytest

from vocalign.launch.cli import main
from vocalign.rewards.base import Sample
from vocalign.rewards.client import RewardClient, RewardRequestError, RewardServerError
from vocalign.rewards.energy import EnergyReward
from vocalign.rewards.wire import MSGPACK, encode, request_payload

from .conftest import REPO

pytestmark = pytest.mark.slow


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(*extra, name="energy", log=subprocess.DEVNULL, path=""):
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "vocalign.launch.cli", "serve-reward", name, "--port", str(port),
                             *extra], cwd=REPO, stdout=subprocess.DEVNULL, stderr=log,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path})
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            urllib.request.urlopen(f"{url}/health", timeout=1)
            return proc, url
        except (urllib.error.URLError, ConnectionError):
            assert proc.poll() is None, "server exited at start"
            assert time.monotonic() < deadline, "server did not come up"
            time.sleep(0.1)


@pytest.fixture
def servers():
    started = []

    def launch(*extra, **options):
        proc, url = start_server(*extra, **options)
        started.append(proc)
        return proc, url

    yield launch
    for proc in started:
        proc.kill()
        proc.wait()


def sample(level, n=1600):
    return Sample(np.full(n, level, np.float32), 16000, "", "en")


def get_json(url):
    return json.loads(urllib.request.urlopen(url, timeout=5).read())


def post(url, body, content_type="application/json"):
    request = urllib.request.Request(f"{url}/score", data=body, headers={"Content-Type": content_type})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def test_64_concurrent_clients_get_their_own_answers_in_order_and_batches_form(servers):
    _, url = servers("--max-batch", "64", "--max-wait-ms", "50")
    reference = EnergyReward()
    levels = [[0.001 * (1 + client) + 0.0001 * k for k in range(3)] for client in range(64)]

    clients = [RewardClient([url], retries=0) for _ in range(64)]

    async def run_all():
        return await asyncio.gather(*(c.score_async([sample(v) for v in lv]) for c, lv in zip(clients, levels)))

    answers = asyncio.run(run_all())
    for client in clients:
        client.close()
    for lv, got in zip(levels, answers):
        expected = reference.score([sample(v) for v in lv])
        assert [r.value for r in got] == pytest.approx([r.value for r in expected], abs=1e-6)
        assert [r.info["rms_dbfs"] for r in got] == pytest.approx([r.info["rms_dbfs"] for r in expected], abs=1e-4)
    info = get_json(f"{url}/info")
    assert info["plugin"] == "energy" and info["requests"] == 64
    assert info["max_batch_size_seen"] > 3 and info["batches"] < 64  # requests were gathered into batches
    big = RewardClient([url], retries=0, max_samples_per_request=100).score([sample(0.01)] * 100)
    assert len(big) == 100
    assert get_json(f"{url}/info")["max_batch_size_seen"] <= 64  # one large request is split into model calls


def test_killed_server_fails_over_then_gives_a_clear_error(servers):
    first, url_a = servers()
    second, url_b = servers()
    client = RewardClient([url_a, url_b], retries=2, backoff_s=0.01, timeout_s=5)
    assert len(client.score([sample(0.1)] * 4)) == 4
    first.kill()
    first.wait()
    for _ in range(4):  # round robin hits the dead server; each time the next one answers
        assert len(client.score([sample(0.1)])) == 1
    assert client.stats.failures_by_url.get(url_a, 0) >= 1
    second.kill()
    second.wait()
    with pytest.raises(RewardServerError, match="no reward server could score 1 samples \\(3 attempts") as err:
        client.score([sample(0.1)])
    assert str(err.value).count(url_a) == 1 and str(err.value).count(url_b) == 1  # each named once
    client.close()


def test_hung_servers_cost_one_timeout_each_then_the_error_names_each_once(servers):
    """SIGSTOPped servers accept connections and never answer: the client must time out, go elsewhere, and not wait
    on the same hung server twice."""
    (first, url_a), (second, url_b) = servers(), servers()
    timeout = 1.0
    client = RewardClient([url_a, url_b], retries=3, backoff_s=0.05, timeout_s=timeout, max_samples_per_request=1)
    try:
        assert len(client.score([sample(0.1)] * 4)) == 4
        assert get_json(f"{url_a}/info")["requests"] == 2 == get_json(f"{url_b}/info")["requests"]  # spread evenly
        os.kill(first.pid, signal.SIGSTOP)
        t0 = time.monotonic()
        assert len(client.score([sample(0.1)] * 4)) == 4  # the two chunks that began at the hung server move on
        one_hung = time.monotonic() - t0
        assert timeout <= one_hung < 2 * timeout and client.stats.failures_by_url == {url_a: 2}
        t0 = time.monotonic()
        assert len(client.score([sample(0.1)] * 4)) == 4
        assert time.monotonic() - t0 < timeout / 2  # the hung server is asked last now: no timeout paid again
        os.kill(second.pid, signal.SIGSTOP)
        t0 = time.monotonic()
        with pytest.raises(RewardServerError, match=f"no answer within {timeout:g} s") as err:
            client.score([sample(0.1)])
        both_hung = time.monotonic() - t0
        assert 2 * timeout <= both_hung < 2 * timeout + 0.5  # one timeout per hung server, each asked once
        assert str(err.value).count(url_a) == 1 and str(err.value).count(url_b) == 1
    finally:
        client.close()
        for proc in (first, second):
            os.kill(proc.pid, signal.SIGCONT)


def test_memory_stays_bounded_under_concurrent_large_requests(servers):
    # 12 concurrent 25 MB requests: unbounded, the server grows by about 350 MB; holding 32 MiB of bodies at once,
    # by about 80 MB
    proc, url = servers("--max-request-mb", "32", "--max-inflight-mb", "32")
    rng = np.random.default_rng(0)
    body = encode(request_payload([Sample(rng.uniform(-0.1, 0.1, 16000 * 59).astype(np.float32), 16000, "", "en")
                                   for _ in range(7)]), MSGPACK)
    server = psutil.Process(proc.pid)
    baseline, peak, done = server.memory_info().rss, [0], threading.Event()

    def watch():
        while not done.is_set():
            peak[0] = max(peak[0], server.memory_info().rss)
            time.sleep(0.005)

    async def send_all():
        async with aiohttp.ClientSession() as session:
            async def one():
                async with session.post(f"{url}/score", data=body, headers={"Content-Type": MSGPACK}) as response:
                    await response.read()
                    return response.status

            return await asyncio.gather(*(one() for _ in range(12)))

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        statuses = asyncio.run(send_all())
    finally:
        done.set()
        watcher.join()
    assert statuses == [200] * 12
    assert (peak[0] - baseline) / 2**20 < 160


def test_serve_reward_port_in_use_is_one_line_and_exit_code_2():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run([sys.executable, "-m", "vocalign.launch.cli", "serve-reward", "energy", "--port",
                                 str(port)], check=False, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and f"cannot serve on 127.0.0.1 port {port}: Address already in use" in lines[0], lines


@pytest.mark.parametrize("args, message", [
    (["--port", "70000"], "--port must be between 1 and 65535, got 70000"),
    (["--max-batch", "0"], "server limit max_batch must be an integer > 0, got 0"),
    (["--max-request-mb", "0"], "server limit max_request_mb must be a number > 0, got 0.0"),
    (["--max-wait-ms", "-1"], "server limit max_wait_ms must be a number >= 0, got -1.0"),
    (["--max-inflight-mb", "1"], "max_inflight_mb (1) must be at least max_request_mb (64)"),
    (["--config", "missing.yaml"], "config file missing.yaml does not exist"),
    (["--config", "{bad}"], "is not valid YAML: while parsing a flow node expected the node content"),
    (["--config", "not-callable.yaml"], "cannot be built from --config not-callable.yaml: 'float' object is not "
                                        "callable"),
    (["--config", "not-a-plugin.yaml"], "json:JSONDecoder built a JSONDecoder, which has no score(samples) method"),
    (["--config", "asr-string.yaml", "cer"], "reward 'cer' cannot be built from --config asr-string.yaml: 'str' "
                                             "object has no attribute 'items'"),
    (["--config", "whisper.yaml", "cer"], "missing 1 required positional argument: 'model'"),
], ids=["port", "max-batch", "max-request-mb", "max-wait-ms", "inflight", "no-config", "bad-yaml",
        "not-callable", "not-a-plugin", "asr-string", "whisper-no-model"])
def test_serve_reward_refuses_bad_settings_in_one_line(tmp_path, monkeypatch, caplog, capsys, args, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "{bad}").write_text("a: [\n")
    for name, text in [("not-callable", "target: math:pi"),
                       ("not-a-plugin", "target: json:JSONDecoder"), ("asr-string", "asr: whisper"),
                       ("whisper", "asr: {en: {kind: whisper}}")]:
        (tmp_path / f"{name}.yaml").write_text(text + "\n")
    name = args.pop() if args[-1] == "cer" else "energy"
    assert main(["serve-reward", name, *args]) == 2
    errors = [r for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and message in errors[0].getMessage() and not errors[0].exc_info
    assert "Traceback" not in capsys.readouterr().err


def test_limits_and_malformed_requests_get_4xx_with_reasons(servers):
    _, url = servers("--max-request-mb", "0.01", "--max-samples-per-request", "4")
    status, body = post(url, b"{not json")
    assert status == 400 and "not valid JSON" in body["error"]
    status, body = post(url, json.dumps({"samples": [{"audio": "AAAA"}]}).encode())
    assert status == 400 and "missing field 'sample_rate'" in body["error"]
    status, body = post(url, b"x" * 20000)
    assert status == 413 and "exceeds" in body["error"]
    status, body = post(url, b"{}", "text/plain")
    assert status == 415
    client = RewardClient([url], retries=0)
    with pytest.raises(RewardRequestError, match="5 samples in one request; the limit is 4"):
        RewardClient([url], retries=0, max_samples_per_request=8).score([sample(0.1, 100)] * 5)
    bad = [sample(0.1, 100), Sample(np.array([np.nan] * 100, np.float32), 16000, "", "en"),
           Sample(np.zeros(0, np.float32), 16000, "", "en"), Sample(np.zeros(100, np.float32), 12345, "", "en")]
    results = client.score(bad)
    # empty audio is the policy's fault: invalid, at the reward's minimum; NaN audio (the synthesis pipeline's)
    # and a rate the server does not take: failed, as in-process scoring says (rewards.base.screen)
    assert [r.status for r in results] == ["ok", "failed", "invalid", "failed"]
    assert np.isnan(results[1].value) and results[2].value == 0.0
    assert "NaN or inf" in results[1].reason and "empty audio" in results[2].reason
    assert "sample 3 audio has sample rate 12345" in results[3].reason


def test_node_launcher_starts_every_server_of_a_spec(tmp_path):
    ports = [free_port(), free_port()]
    spec = tmp_path / "servers.txt"
    spec.write_text(f"# two loudness servers\nenergy {ports[0]} -\nenergy {ports[1]}\n")
    env = {**os.environ, "VOCALIGN": f"{sys.executable} -m vocalign.launch.cli"}
    proc = subprocess.Popen(["bash", "launch/serve_rewards.sh", str(spec), str(tmp_path / "logs")], cwd=REPO,
                            env=env, stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        ready = [proc.stdout.readline().split()[1] for _ in ports]
        assert ready == [f"energy=http://127.0.0.1:{p}" for p in ports]
        urls = [r.split("=", 1)[1] for r in ready]
        assert len(RewardClient(urls, retries=0).score([sample(0.1)] * 4)) == 4
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(timeout=30)


def test_half_sent_headers_are_cut_after_header_timeout_and_framing_errors_log_one_line(tmp_path):
    log = tmp_path / "server.log"
    with log.open("w") as sink:
        proc, url = start_server("--header-timeout-s", "0.5", log=sink)
    try:
        port = int(url.rsplit(":", 1)[1])
        half = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(50)]
        for sock in half:
            sock.sendall(b"POST /score HTTP/1.1\r\nHost: x\r\n")  # the headers never end
        t0 = time.monotonic()
        assert all(sock.recv(100) == b"" for sock in half)  # closed by the server
        assert 0.4 < time.monotonic() - t0 < 2.0
        for sock in half:
            sock.close()
        for _ in range(3):
            with socket.create_connection(("127.0.0.1", port), timeout=5) as bad:
                bad.sendall(b"POST /score HTTP/1.1\r\nHost: x\r\nContent-Length: ten\r\n\r\n")
                assert b" 400 " in bad.recv(200).split(b"\r\n")[0]
        assert len(RewardClient([url], retries=0).score([sample(0.1)])) == 1
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    lines = [line for line in log.read_text().splitlines() if "Error handling request" in line]
    assert len(lines) == 3 and "Traceback" not in log.read_text(), log.read_text()[-2000:]
    assert "InvalidHeader" in lines[0] or "BadHttpMessage" in lines[0], lines[0]


PACED = """
import time

from vocalign.rewards.base import RewardResult


class FakePacedReward:
    \"\"\"A model of known speed: ``rate`` samples per second, whatever the batch.\"\"\"

    def __init__(self, rate):
        self.rate = rate

    def score(self, samples):
        time.sleep(len(samples) / self.rate)
        return [RewardResult(float(s.audio[0])) for s in samples]
"""


def test_after_a_kill_9_the_survivor_completes_every_call_it_has_the_capacity_for(servers, tmp_path):
    (tmp_path / "paced.py").write_text(PACED)
    (tmp_path / "paced.yaml").write_text("target: paced:FakePacedReward\nrate: 400\n")
    (doomed, url_a), (_, url_b) = (servers("--config", str(tmp_path / "paced.yaml"), path=str(tmp_path))
                                   for _ in range(2))
    client = RewardClient([url_a, url_b], timeout_s=3, retries=3, backoff_s=0.05)
    calls = [[sample(0.01 * (k + 1))] * 128 for k in range(4)]  # 512 samples: 1.3 s for one server alone

    async def all_calls():
        return await asyncio.gather(*(client.score_async(call) for call in calls))

    killer = threading.Timer(0.3, doomed.kill)  # mid-way, with chunks queued on it
    killer.start()
    try:
        t0 = time.monotonic()
        answers = asyncio.run(all_calls())
        took = time.monotonic() - t0
    finally:
        killer.join()
        client.close()
    for call, got in zip(calls, answers):
        assert [r.status for r in got] == ["ok"] * 128
        assert [r.value for r in got] == pytest.approx([s.audio[0] for s in call])
    assert set(client.stats.failures_by_url) == {url_a} and took < 3  # the survivor was never taken for hung
