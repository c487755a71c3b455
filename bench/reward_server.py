"""Reward-server throughput: batched serving vs one request per sample (the released GLM-TTS way).

Both use the same server process, plugin and machine in this run. ``--plugin sim``: speaker similarity on a randomly
initialised WavLM x-vector model of configurable size (no hub needed), compute-bound; ``--plugin energy``: no model,
so the per-request cost (HTTP, encoding, scheduling) is all there is. Prints samples/s of each and the ratio, and
the batched requests sent with a plain aiohttp session, to show what the client itself costs.
Run: .venv/bin/python bench/reward_server.py [--plugin sim|energy] [--samples 64] [--seconds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import aiohttp
import numpy as np
import torch
import yaml
from transformers import Wav2Vec2FeatureExtractor, WavLMConfig, WavLMForXVector

from vocalign.rewards.base import Sample
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--plugin", choices=["sim", "energy"], default="sim")
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--max-batch", type=int, default=16)
    args = parser.parse_args()
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
