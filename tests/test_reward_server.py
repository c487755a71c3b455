"""Reward servers as real processes on loopback: batching, order, failover, limits."""

import asyncio
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import numpy as np
import pytest

from vocalign.rewards.base import Sample
from vocalign.rewards.client import RewardClient, RewardRequestError, RewardServerError
from vocalign.rewards.energy import EnergyReward

from .conftest import REPO

pytestmark = pytest.mark.slow


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(*extra, name="energy"):
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "vocalign.launch.cli", "serve-reward", name, "--port", str(port),
                             *extra], cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
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

    def launch(*extra):
        proc, url = start_server(*extra)
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

    async def run_all():
        clients = [RewardClient([url], retries=0) for _ in range(64)]
        return await asyncio.gather(*(c.score_async([sample(v) for v in lv]) for c, lv in zip(clients, levels)))

    answers = asyncio.run(run_all())
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
    with pytest.raises(RewardServerError, match=f"all 3 attempts failed.*{url_a}|{url_b}") as err:
        client.score([sample(0.1)])
    assert url_a in str(err.value) and url_b in str(err.value)


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
    with pytest.raises(RewardRequestError) as err:
        client.score(bad)
    text = str(err.value)
    assert "422" in text and "sample 1 audio contains NaN" in text and "sample 2 audio is empty" in text
    assert "sample 3 audio has sample rate 12345" in text


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
