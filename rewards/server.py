"""An HTTP server around any reward plugin, with dynamic batching.

Reward models are far more efficient on batches, while a trainer's processes (and an eval script) send requests
whenever they are ready. The server queues the samples of concurrent requests and runs the model on up to
``max_batch`` of them at once, waiting at most ``max_wait_ms`` for a batch to fill. It binds to 127.0.0.1 unless told
otherwise, caps request size and samples per request, checks every sample's audio before it reaches the model, and
never unpickles anything.

Endpoints: ``POST /score`` (JSON or msgpack, see :mod:`wire`), ``GET /health``, ``GET /info``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from .audio import BadAudioError, check_audio
from .base import RewardPlugin, RewardResult, Sample, plugin_requires
from .wire import JSON, MSGPACK, WireError, decode, encode, sample_from_wire, upstream_from_wire

logger = logging.getLogger(__name__)


@dataclass
class ServerLimits:
    max_batch: int = 32  # samples per model call
    max_wait_ms: float = 5.0  # how long a batch may wait to fill; requests that queue up meanwhile join at once
    max_request_bytes: int = 64 * 2**20
    max_samples_per_request: int = 256
    max_audio_seconds: float = 60.0


@dataclass
class _Job:
    samples: list[Sample]
    upstream: dict[str, list[RewardResult]]
    future: asyncio.Future = field(repr=False)


class RewardServer:
    def __init__(self, plugin: RewardPlugin, limits: ServerLimits | None = None, version: str = "") -> None:
        self.plugin, self.limits, self.version = plugin, limits or ServerLimits(), version
        self.requires = plugin_requires(plugin)
        self.queue: asyncio.Queue[_Job] = asyncio.Queue()
        self.batch_sizes: deque[int] = deque(maxlen=10000)
        self.requests = 0
        self.started = time.time()

    # ------------------------------------------------------------------ batching
    async def _batcher(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            jobs = [await self.queue.get()]
            size = len(jobs[0].samples)
            deadline = loop.time() + self.limits.max_wait_ms / 1000
            while size < self.limits.max_batch:
                try:  # what queued up while the model was busy joins at once
                    job = self.queue.get_nowait()
                except asyncio.QueueEmpty:
                    timeout = deadline - loop.time()
                    if timeout <= 0:
                        break
                    try:
                        job = await asyncio.wait_for(self.queue.get(), timeout)
                    except asyncio.TimeoutError:
                        break
                jobs.append(job)
                size += len(job.samples)
            await self._run(jobs)

    async def _run(self, jobs: list[_Job]) -> None:
        samples = [s for j in jobs for s in j.samples]
        upstream = {name: [r for j in jobs for r in j.upstream[name]] for name in self.requires}
        try:
            results = await asyncio.get_running_loop().run_in_executor(None, self._score, samples, upstream)
        except Exception as err:  # noqa: BLE001 -- a model failure is reported to every waiting request
            logger.exception("reward %s failed on a batch of %d", self.plugin.name, len(samples))
            for job in jobs:
                if not job.future.done():
                    job.future.set_exception(err)
            return
        start = 0
        for job in jobs:
            if not job.future.done():
                job.future.set_result(results[start:start + len(job.samples)])
            start += len(job.samples)

    def _score(self, samples: Sequence[Sample], upstream: dict[str, list[RewardResult]]) -> list[RewardResult]:
        """Model calls of at most ``max_batch`` samples (one large request is split, never run whole)."""
        results: list[RewardResult] = []
        step = self.limits.max_batch
        for start in range(0, len(samples), step):
            part = samples[start:start + step]
            if self.requires:
                out = self.plugin.score(part, upstream={k: v[start:start + step] for k, v in upstream.items()})
            else:
                out = self.plugin.score(part)
            if len(out) != len(part):
                raise RuntimeError(f"plugin returned {len(out)} results for {len(part)} samples")
            self.batch_sizes.append(len(part))
            results.extend(out)
        return results

    # ------------------------------------------------------------------ HTTP
    def _reply(self, request: web.Request, payload: Any, status: int = 200) -> web.Response:
        kind = MSGPACK if MSGPACK in request.headers.get("Accept", request.content_type) else JSON
        return web.Response(body=encode(payload, kind), status=status, content_type=kind)

    def _error(self, request: web.Request, status: int, reason: str, **extra: Any) -> web.Response:
        return self._reply(request, {"error": reason, **extra}, status)

    async def score(self, request: web.Request) -> web.Response:
        kind = request.content_type
        if kind not in (JSON, MSGPACK):
            return self._error(request, 415, f"Content-Type must be {JSON} or {MSGPACK}, got {kind!r}")
        try:
            body = await request.read()
        except web.HTTPRequestEntityTooLarge:
            return self._error(request, 413, f"request body exceeds {self.limits.max_request_bytes} bytes; "
                                             "send fewer samples per request")
        try:
            payload = decode(body, kind)
            if not isinstance(payload, dict) or not isinstance(payload.get("samples"), list):
                raise WireError("body must be an object with a 'samples' list")
            raw = payload["samples"]
            if not raw:
                raise WireError("'samples' is empty")
            if len(raw) > self.limits.max_samples_per_request:
                return self._error(request, 413, f"{len(raw)} samples in one request; the limit is "
                                                 f"{self.limits.max_samples_per_request}")
            samples = [sample_from_wire(item, i) for i, item in enumerate(raw)]
            upstream = upstream_from_wire(payload.get("upstream"), len(samples))
        except WireError as err:
            return self._error(request, 400, str(err))
        missing = [n for n in self.requires if n not in upstream]
        if missing:
            return self._error(request, 422, f"reward {self.plugin.name!r} needs upstream results {missing}")
        problems = []
        for i, s in enumerate(samples):
            for what, audio, rate in (("audio", s.audio, s.sample_rate),
                                      ("prompt_audio", s.prompt_audio, s.prompt_sample_rate)):
                if audio is None:
                    continue
                try:
                    check_audio(audio, rate or 0, what=f"sample {i} {what}", max_seconds=self.limits.max_audio_seconds)
                except BadAudioError as err:
                    problems.append({"index": i, "reason": str(err)})
        if problems:
            return self._error(request, 422, "some samples cannot be scored", samples=problems)

        self.requests += 1
        future = asyncio.get_running_loop().create_future()
        await self.queue.put(_Job(samples, upstream, future))
        try:
            results = await future
        except Exception as err:  # noqa: BLE001 -- the model's failure goes back to the client as a 500
            return self._error(request, 500, f"reward {self.plugin.name!r} failed: {type(err).__name__}: {err}")
        return self._reply(request, {"results": [{"value": r.value, "info": r.info} for r in results]})

    async def health(self, request: web.Request) -> web.Response:
        return self._reply(request, {"status": "ok"})

    async def info(self, request: web.Request) -> web.Response:
        sizes = list(self.batch_sizes)
        return self._reply(request, {
            "plugin": self.plugin.name, "class": type(self.plugin).__qualname__, "version": self.version,
            "requires": list(self.requires), "limits": vars(self.limits), "requests": self.requests,
            "batches": len(sizes), "mean_batch_size": sum(sizes) / len(sizes) if sizes else 0.0,
            "max_batch_size_seen": max(sizes, default=0), "recent_batch_sizes": sizes[-100:],
            "uptime_s": time.time() - self.started,
        })

    def app(self) -> web.Application:
        application = web.Application(client_max_size=self.limits.max_request_bytes)
        application.router.add_post("/score", self.score)
        application.router.add_get("/health", self.health)
        application.router.add_get("/info", self.info)

        async def start_batcher(app: web.Application) -> None:
            app["batcher"] = asyncio.create_task(self._batcher())

        async def stop_batcher(app: web.Application) -> None:
            app["batcher"].cancel()

        application.on_startup.append(start_batcher)
        application.on_cleanup.append(stop_batcher)
        return application


def serve(plugin: RewardPlugin, host: str = "127.0.0.1", port: int = 8100, limits: ServerLimits | None = None,
          version: str = "") -> None:
    if host not in ("127.0.0.1", "localhost", "::1"):
        logger.warning("reward server %s listens on %s: every host that can reach it may send work",
                       plugin.name, host)
    logger.info("serving reward %s on http://%s:%d", plugin.name, host, port)
    web.run_app(RewardServer(plugin, limits, version).app(), host=host, port=port, print=None)
