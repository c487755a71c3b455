"""An HTTP server around any reward plugin: dynamic batching, fair between requests, bounded in every resource.

Reward models are far more efficient on batches, while a trainer's processes (and an eval script) send requests
whenever they are ready. The server queues the samples of concurrent requests and runs the model on up to
``max_batch`` of them (and ``max_batch_audio_s`` seconds of audio) at once, waiting at most ``max_wait_ms`` for a batch
to fill. A batch takes one sample from each waiting request in turn, so a large request is scored over several model
calls and a small one that arrives meanwhile waits for one call, not for the whole large request.

What a client can claim is bounded (see :class:`~.limits.ServerLimits`): body size (413 before the body is read),
bytes held across requests (a request waits for room, so memory stays flat), queued samples (503 at once, so the
client tries another server), upload time (408), samples per request, audio length and text length (422 naming each
sample). A request whose client disconnected is dropped from the queue, not scored.

A failure stays with the request that caused it. When a model call fails, each request in it is scored apart, then
each sample of a failing request, so the others get their results and the culprit's request gets the reasons of its
own samples: 422 when the plugin raised ``ValueError`` (its way to say "I cannot score this input", e.g. a language
without an ASR model) and 500 for anything else. The server binds to 127.0.0.1 unless told otherwise and never
unpickles anything.

Endpoints: ``POST /score`` (JSON or msgpack, see :mod:`wire`), ``GET /health``, ``GET /info``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter, deque
from collections.abc import AsyncIterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from aiohttp import web

from .audio import BadAudioError, check_audio
from .base import RewardPlugin, RewardResult, Sample, plugin_requires
from .limits import ServerLimits
from .wire import JSON, MSGPACK, WireError, decode, encode, results_to_wire, sample_from_wire, upstream_from_wire

logger = logging.getLogger(__name__)


@dataclass(eq=False)
class _Job:
    """One request's samples on their way through the queue; each result lands at its sample's index."""

    samples: list[Sample]
    upstream: dict[str, list[RewardResult]]
    arrived: float
    future: asyncio.Future = field(repr=False)
    taken: int = 0  # samples handed to model calls so far
    results: list[RewardResult | None] = field(init=False)

    def __post_init__(self) -> None:
        self.results = [None] * len(self.samples)


class _SampleFailures(Exception):
    """The samples of one request that the plugin could not score, with what it raised for each."""

    def __init__(self, failures: list[tuple[int, Exception]]) -> None:
        super().__init__(f"{len(failures)} samples failed")
        self.failures = failures


class _Refused(Exception):
    """A request the server answers with a 4xx/5xx status and a reason (and per-sample reasons in ``extra``)."""

    def __init__(self, status: int, reason: str, **extra: Any) -> None:
        super().__init__(reason)
        self.status, self.reason, self.extra = status, reason, extra


class _ByteBudget:
    """Request bytes the server holds at once; a request waits for room, so memory stays bounded however many
    large requests arrive together (their bodies wait in the kernel's socket buffers meanwhile)."""

    def __init__(self, limit: int) -> None:
        self.limit, self.used = limit, 0
        self._freed = asyncio.Event()

    async def acquire(self, n: int) -> None:
        while self.used + n > self.limit:  # the event loop runs one task at a time: check and take are atomic
            self._freed.clear()
            await self._freed.wait()
        self.used += n

    def release(self, n: int) -> None:
        self.used -= n
        self._freed.set()


def _seconds(sample: Sample) -> float:
    prompt = sample.prompt_audio.size / (sample.prompt_sample_rate or 1) if sample.prompt_audio is not None else 0.0
    return sample.audio.size / sample.sample_rate + prompt


class RewardServer:
    def __init__(self, plugin: RewardPlugin, limits: ServerLimits | None = None, version: str = "") -> None:
        self.plugin, self.limits, self.version = plugin, limits or ServerLimits(), version
        self.requires = plugin_requires(plugin)
        self.batch_sizes: Counter[int] = Counter()  # size -> model calls; at most max_batch keys
        self.requests = 0
        self.started = time.time()
        self._pending: deque[_Job] = deque()  # requests with samples not yet handed to a model call
        self._queued = 0  # those samples
        self._arrived = asyncio.Event()
        self._budget = _ByteBudget(self.limits.max_inflight_bytes)

    # ------------------------------------------------------------------ batching
    async def _batcher(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            self._arrived.clear()
            if not self._pending:
                await self._arrived.wait()
                continue
            # what queued up while the model was busy has waited already: it goes at once
            wait = min(j.arrived for j in self._pending) + self.limits.max_wait_ms / 1000 - loop.time()
            if self._queued < self.limits.max_batch and wait > 0:
                try:
                    await asyncio.wait_for(self._arrived.wait(), wait)
                except asyncio.TimeoutError:
                    pass
                continue
            await self._run(self._take_batch())

    def _take_batch(self) -> list[tuple[_Job, int]]:
        """Up to ``max_batch`` samples and ``max_batch_audio_s`` seconds, one from each waiting request in turn."""
        batch: list[tuple[_Job, int]] = []
        seconds = 0.0
        while self._pending and len(batch) < self.limits.max_batch:
            job = self._pending[0]
            length = _seconds(job.samples[job.taken])
            if batch and seconds + length > self.limits.max_batch_audio_s:
                break
            batch.append((job, job.taken))
            job.taken += 1
            self._queued -= 1
            seconds += length
            if job.taken == len(job.samples):
                self._pending.popleft()
            else:
                self._pending.rotate(-1)
        return batch

    def _drop(self, job: _Job) -> None:
        """Take a request's unscored samples out of the queue (its client left, or one of its samples failed)."""
        if job in self._pending:
            self._pending.remove(job)
            self._queued -= len(job.samples) - job.taken

    async def _run(self, batch: list[tuple[_Job, int]]) -> None:
        self.batch_sizes[len(batch)] += 1
        outcomes = await asyncio.get_running_loop().run_in_executor(None, self._score_apart, batch)
        failures: dict[_Job, list[tuple[int, Exception]]] = {}
        for (job, index), outcome in zip(batch, outcomes):
            failures.setdefault(job, [])
            if isinstance(outcome, Exception):
                failures[job].append((index, outcome))
            else:
                job.results[index] = outcome
        for job, failed in failures.items():
            if job.future.done():  # its client went away
                continue
            if failed:
                self._drop(job)
                job.future.set_exception(_SampleFailures(failed))
            elif job.taken == len(job.samples) and all(r is not None for r in job.results):
                job.future.set_result(job.results)

    def _score_apart(self, batch: list[tuple[_Job, int]]) -> Sequence[RewardResult | Exception]:
        """One model call's outcome per sample; when the call fails, each request's part and then each sample is
        scored on its own, so that an error is pinned on the samples that cause it and no other request pays."""
        try:
            return self._call(batch)
        except Exception as err:  # noqa: BLE001 -- a plugin may raise anything; it goes back to the samples' request
            if len(batch) == 1:
                index = batch[0][1]
                log = logger.warning if isinstance(err, ValueError) else logger.exception
                log("reward %s cannot score sample %d of a request: %s", self.plugin.name, index, err)
                return [err]
        jobs = list(dict.fromkeys(job for job, _ in batch))
        parts = [[item for item in batch if item[0] is job] for job in jobs] if len(jobs) > 1 else [[i] for i in batch]
        scored = {item: outcome for part in parts for item, outcome in zip(part, self._score_apart(part))}
        return [scored[item] for item in batch]

    def _call(self, batch: Sequence[tuple[_Job, int]]) -> list[RewardResult]:
        samples = [job.samples[i] for job, i in batch]
        if self.requires:
            upstream = {name: [job.upstream[name][i] for job, i in batch] for name in self.requires}
            out = self.plugin.score(samples, upstream=upstream)  # type: ignore[call-arg]
        else:
            out = self.plugin.score(samples)
        if len(out) != len(samples):
            raise RuntimeError(f"plugin returned {len(out)} results for {len(samples)} samples")
        return list(out)

    # ------------------------------------------------------------------ HTTP
    def _reply(self, request: web.Request, payload: Any, status: int = 200) -> web.Response:
        kind = MSGPACK if MSGPACK in request.headers.get("Accept", request.content_type) else JSON
        return web.Response(body=encode(payload, kind), status=status, content_type=kind)

    def _error(self, request: web.Request, status: int, reason: str, **extra: Any) -> web.Response:
        return self._reply(request, {"error": reason, **extra}, status)

    async def score(self, request: web.Request) -> web.Response:
        try:
            return await self._score(request)
        except _Refused as refused:
            return self._error(request, refused.status, refused.reason, **refused.extra)

    async def _score(self, request: web.Request) -> web.Response:
        kind = request.content_type
        if kind not in (JSON, MSGPACK):
            raise _Refused(415, f"Content-Type must be {JSON} or {MSGPACK}, got {kind!r}")
        limit = self.limits.max_request_bytes
        declared = request.content_length
        if declared is not None and declared > limit:
            raise _Refused(413, f"request body exceeds {limit} bytes; send fewer samples per request")
        # a compressed or chunked body may grow up to the limit as it is read
        claim = limit if declared is None or "Content-Encoding" in request.headers else declared
        try:
            await asyncio.wait_for(self._budget.acquire(claim), self.limits.body_timeout_s)
        except asyncio.TimeoutError:
            raise _Refused(503, f"server busy: no room for {claim} more request bytes within "
                                f"{self.limits.body_timeout_s:g} s; try another server") from None
        try:
            samples, upstream = self._parse(await self._read(request))  # the decoded body is freed once parsed
            return await self._enqueue(request, samples, upstream)
        finally:
            self._budget.release(claim)

    async def _read(self, request: web.Request) -> Any:
        try:
            body = await asyncio.wait_for(self._receive(request), self.limits.body_timeout_s)
        except asyncio.TimeoutError:
            raise _Refused(408, f"request body not received within {self.limits.body_timeout_s:g} s") from None
        try:
            return decode(body, request.content_type)
        except WireError as err:
            raise _Refused(400, str(err)) from None

    async def _receive(self, request: web.Request) -> bytearray:
        """The (decompressed) body, read here rather than by ``request.read()``, which keeps a copy on the request
        for as long as the client holds the connection open."""
        body = bytearray()
        async for chunk in request.content.iter_any():
            body += chunk
            if len(body) > self.limits.max_request_bytes:
                raise _Refused(413, f"request body exceeds {self.limits.max_request_bytes} bytes; "
                                    "send fewer samples per request")
        return body

    def _parse(self, payload: Any) -> tuple[list[Sample], dict[str, list[RewardResult]]]:
        try:
            if not isinstance(payload, dict) or not isinstance(payload.get("samples"), list):
                raise WireError("body must be an object with a 'samples' list")
            raw = payload["samples"]
            if not raw:
                raise WireError("'samples' is empty")
            if len(raw) > self.limits.max_samples_per_request:
                raise _Refused(413, f"{len(raw)} samples in one request; the limit is "
                                    f"{self.limits.max_samples_per_request}")
            samples = [sample_from_wire(item, i) for i, item in enumerate(raw)]
            upstream = upstream_from_wire(payload.get("upstream"), len(samples))
        except WireError as err:
            raise _Refused(400, str(err)) from None
        missing = [n for n in self.requires if n not in upstream]
        if missing:
            raise _Refused(422, f"reward {self.plugin.name!r} needs upstream results {missing}")
        problems = [{"index": i, "reason": reason} for i, s in enumerate(samples) for reason in self._check(i, s)]
        if problems:
            raise _Refused(422, "some samples cannot be scored", samples=problems)
        if self._queued + len(samples) > self.limits.max_queued_samples:
            raise _Refused(503, f"server busy: {self._queued} samples queued (limit "
                                f"{self.limits.max_queued_samples}); try another server")
        return samples, upstream

    async def _enqueue(self, request: web.Request, samples: list[Sample],
                       upstream: dict[str, list[RewardResult]]) -> web.Response:
        self.requests += 1
        loop = asyncio.get_running_loop()
        job = _Job(samples, upstream, loop.time(), loop.create_future())
        self._pending.append(job)
        self._queued += len(samples)
        self._arrived.set()
        try:
            results = await job.future
        except _SampleFailures as err:
            reasons = [{"index": i, "reason": f"{type(e).__name__}: {e}"} for i, e in err.failures]
            if all(isinstance(e, ValueError) for _, e in err.failures):
                raise _Refused(422, f"reward {self.plugin.name!r} cannot score some samples", samples=reasons) from None
            raise _Refused(500, f"reward {self.plugin.name!r} failed", samples=reasons) from None
        finally:
            self._drop(job)  # a no-op unless the client went away (the handler is cancelled then)
        return self._reply(request, {"results": results_to_wire(results)})

    def _check(self, index: int, sample: Sample) -> list[str]:
        """Why ``sample`` cannot be scored, before it reaches the model (empty when it can)."""
        reasons = []
        for what, audio, rate in (("audio", sample.audio, sample.sample_rate),
                                  ("prompt_audio", sample.prompt_audio, sample.prompt_sample_rate)):
            if audio is not None:
                try:
                    check_audio(audio, rate or 0, what=f"sample {index} {what}", max_seconds=self.limits.max_audio_seconds)
                except BadAudioError as err:
                    reasons.append(str(err))
        if len(sample.text) > self.limits.max_text_chars:
            reasons.append(f"sample {index} text has {len(sample.text)} characters; the limit is "
                           f"{self.limits.max_text_chars}")
        return reasons

    async def health(self, request: web.Request) -> web.Response:
        return self._reply(request, {"status": "ok"})

    async def info(self, request: web.Request) -> web.Response:
        batches = sum(self.batch_sizes.values())
        return self._reply(request, {
            "plugin": self.plugin.name, "class": type(self.plugin).__qualname__, "version": self.version,
            "requires": list(self.requires), "limits": asdict(self.limits), "requests": self.requests,
            "batches": batches, "batch_size_histogram": {str(k): v for k, v in sorted(self.batch_sizes.items())},
            "mean_batch_size": sum(k * v for k, v in self.batch_sizes.items()) / batches if batches else 0.0,
            "max_batch_size_seen": max(self.batch_sizes, default=0), "queued_samples": self._queued,
            "held_request_bytes": self._budget.used, "uptime_s": time.time() - self.started,
        })

    def app(self) -> web.Application:
        # handler_cancellation: a request whose client disconnects is cancelled, so its samples leave the queue
        application = web.Application(handler_args={"handler_cancellation": True})
        application.router.add_post("/score", self.score)
        application.router.add_get("/health", self.health)
        application.router.add_get("/info", self.info)

        async def batching(app: web.Application) -> AsyncIterator[None]:
            batcher = asyncio.create_task(self._batcher())
            yield
            batcher.cancel()

        application.cleanup_ctx.append(batching)
        return application


def serve(plugin: RewardPlugin, host: str = "127.0.0.1", port: int = 8100, limits: ServerLimits | None = None,
          version: str = "") -> None:
    if host not in ("127.0.0.1", "localhost", "::1"):
        logger.warning("reward server %s listens on %s: every host that can reach it may send work",
                       plugin.name, host)
    web.run_app(RewardServer(plugin, limits, version).app(), host=host, port=port,  # logged once listening
                print=lambda _: logger.info("serving reward %s on http://%s:%d", plugin.name, host, port))
