"""Reward-server throughput: batched serving vs one request per sample (the released GLM-TTS way), and what a server
delivers under overload.

Throughput (the default): both use the same server process, plugin and machine in this run. ``--plugin sim``: speaker
similarity on a randomly initialised WavLM x-vector model of configurable size (no hub needed), compute-bound;
``--plugin energy``: no model, so the per-request cost (HTTP, encoding, scheduling) is all there is. Prints samples/s
of each and the ratio, and the batched requests sent with a plain aiohttp session, to show what the client costs.
Run: .venv/bin/python bench/reward_server.py [--plugin sim|energy] [--samples 64] [--seconds 3]

Overload (``--overload``): one server whose model scores ``--rate`` samples/s (a paced stand-in for a model of known
speed), and waves of concurrent calls of 64 samples, each with ``timeout_s`` ``--deadline``, holding 1x, 2x and 4x the
work the server can do within that deadline. Prints, per level, the samples delivered per second (scored and returned
to a call in time) and the share of calls that got every sample scored.
Run: .venv/bin/python bench/reward_server.py --overload [--rate 100] [--deadline 5]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

import aiohttp
import numpy as np
import torch
import yaml
from transformers import Wav2Vec2FeatureExtractor, WavLMConfig, WavLMForXVector

from vocalign.rewards.base import RewardResult, Sample
from vocalign.rewards.client import RewardClient
from vocalign.rewards.wire import MSGPACK, decode, encode, request_payload


def write_model(folder: Path, hidden: int, layers: int) -> None:
    torch.manual_seed(0)
    config = WavLMConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
                         intermediate_size=hidden * 4, tdnn_dim=(256, 256, 256, 256, 1500), xvector_output_dim=256)
    WavLMForXVector(config).save_pretrained(folder)
    Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=16000, padding_value=0.0, do_normalize=True,
                             return_attention_mask=True).save_pretrained(folder)


def start(plugin: str, config: Path, max_batch: int, max_wait_ms: float) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "vocalign.launch.cli", "serve-reward", plugin, "--config",
                             str(config), "--port", str(port), "--max-batch", str(max_batch), "--max-wait-ms", str(max_wait_ms)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            urllib.request.urlopen(f"{url}/health", timeout=1)
            return proc, url
        except (urllib.error.URLError, ConnectionError):
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("the reward server did not start")


async def raw_aiohttp(url: str, samples: list[Sample], chunk: int) -> None:
    """The batched client's requests sent with one plain aiohttp session: the yardstick for the client's overhead."""
    async with aiohttp.ClientSession() as session:
        async def post(part: list[Sample]) -> None:
            async with session.post(f"{url}/score", data=encode(request_payload(part), MSGPACK),
                                    headers={"Content-Type": MSGPACK, "Accept": MSGPACK}) as response:
                assert len(decode(await response.read(), MSGPACK)["results"]) == len(part)

        await asyncio.gather(*(post(samples[i:i + chunk]) for i in range(0, len(samples), chunk)))


class PacedReward:
    """A model that scores ``rate`` samples per second whatever the batch: the server's capacity, known exactly."""

    name = "paced"

    def __init__(self, rate: float) -> None:
        self.rate = rate

    def score(self, samples: list[Sample]) -> list[RewardResult]:
        time.sleep(len(samples) / self.rate)
        return [RewardResult(1.0) for _ in samples]


def serve_in_thread(plugin: PacedReward) -> tuple[str, Callable[[], None]]:
    """A reward server on 127.0.0.1 in this process, in its own event-loop thread; returns its URL and a stop."""
    from aiohttp import web

    from vocalign.rewards.server import RewardServer

    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, daemon=True).start()

    async def up() -> web.AppRunner:
        runner = web.AppRunner(RewardServer(plugin).app(), shutdown_timeout=1.0)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        return runner

    runner = asyncio.run_coroutine_threadsafe(up(), loop).result(10)

    def stop() -> None:
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(30)
        loop.call_soon_threadsafe(loop.stop)

    return f"http://127.0.0.1:{runner.addresses[0][1]}", stop


def overload(rate: float, deadline: float, per_call: int) -> None:
    samples = [Sample(np.full(1600, 0.1, np.float32), 16000, "", "en") for _ in range(per_call)]
    print(f"one server at {rate:g} samples/s; calls of {per_call} samples with timeout_s {deadline:g}; "
          f"{os.cpu_count()} CPUs")
    print("load  calls  delivered samples/s  calls succeeding")
    for factor in (1, 2, 4):
        url, stop = serve_in_thread(PacedReward(rate))
        calls = max(1, round(factor * rate * deadline / per_call))
        clients = [RewardClient([url], timeout_s=deadline) for _ in range(calls)]

        async def one(client: RewardClient) -> int:
            try:
                results = await client.score_async(samples)
            except ConnectionError:  # no sample of the call came back (the client before per-sample outcomes)
                return 0
            return sum(getattr(r, "status", "ok") == "ok" for r in results)

        async def wave(clients: list[RewardClient]) -> list[int]:
            return await asyncio.gather(*(one(c) for c in clients))

        t0 = time.perf_counter()
        delivered = asyncio.run(wave(clients))
        elapsed = time.perf_counter() - t0
        for client in clients:
            client.close()
        stop()
        print(f"{factor}x    {calls:5d}  {sum(delivered) / elapsed:19.1f}  "
              f"{sum(d == per_call for d in delivered)}/{calls}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--overload", action="store_true", help="measure delivery under 1x, 2x and 4x overload")
    parser.add_argument("--rate", type=float, default=100.0, help="--overload: the model's samples/s")
    parser.add_argument("--deadline", type=float, default=5.0, help="--overload: each call's timeout_s")
    parser.add_argument("--plugin", choices=["sim", "energy"], default="sim")
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--max-batch", type=int, default=16)
    args = parser.parse_args()
    if args.overload:
        overload(args.rate, args.deadline, per_call=64)
        return
    rng = np.random.default_rng(0)
    samples = [Sample(rng.normal(0, 0.1, int(args.seconds * 16000)).astype(np.float32), 16000, "", "en",
                      rng.normal(0, 0.1, int(args.seconds * 16000)).astype(np.float32), 16000)
               for _ in range(args.samples)]
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "plugin.yaml"
        settings = {}
        if args.plugin == "sim":
            folder = Path(tmp) / "xvector"
            write_model(folder, args.hidden, args.layers)
            settings = {"encoder": {"kind": "xvector", "model": str(folder)}}
        config.write_text(yaml.safe_dump(settings))
        # the baseline server does no batching and never waits, like the released per-sample servers
        single_proc, single_url = start(args.plugin, config, 1, 0)
        proc, url = start(args.plugin, config, args.max_batch, 5)
        single = RewardClient([single_url], retries=0)
        client = RewardClient([url], retries=0, max_samples_per_request=args.max_batch)
        try:
            single.score(samples[:2])  # warm-up: connections, allocations, the server's first large batches
            client.score(samples)
            asyncio.run(raw_aiohttp(url, samples, args.max_batch))

            async def one_request_per_sample() -> None:
                for s in samples:  # each awaited in turn (over one kept-alive connection)
                    await single.score_async([s])

            t0 = time.perf_counter()
            asyncio.run(one_request_per_sample())
            one_by_one = time.perf_counter() - t0
            t0 = time.perf_counter()
            client.score(samples)  # chunks sent concurrently, gathered into batches by the server
            batched = time.perf_counter() - t0
            t0 = time.perf_counter()
            asyncio.run(raw_aiohttp(url, samples, args.max_batch))  # the same requests, no client around them
            raw = time.perf_counter() - t0
        finally:
            single.close()
            client.close()
            proc.kill()
            single_proc.kill()
    model = (f"WavLM x-vector, hidden {args.hidden}, {args.layers} layers, random weights" if args.plugin == "sim"
             else "no model")
    print(f"plugin: {args.plugin} ({model}); {args.samples} samples of {args.seconds:.1f} s + prompts; server max batch {args.max_batch}; "
          f"{os.cpu_count()} CPUs")
    print(f"one request per sample  {args.samples / one_by_one:8.2f} samples/s")
    print(f"batched                 {args.samples / batched:8.2f} samples/s")
    print(f"ratio batched/one-by-one = {one_by_one / batched:.2f}x")
    print(f"raw aiohttp, same chunks {args.samples / raw:8.2f} samples/s (RewardClient reaches {raw / batched:.0%} of it)")


if __name__ == "__main__":
    main()
