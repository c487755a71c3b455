"""An HTTP server around any reward plugin: dynamic batching, delivering under overload, bounded in every resource.

Reward models are far more efficient on batches, while a trainer's processes (and an eval script) send requests
whenever they are ready. The server queues the samples of concurrent requests and runs the model on up to
``max_batch`` of them (and ``max_batch_audio_s`` seconds of audio) at once, waiting at most ``max_wait_ms`` for a batch
to fill. A batch takes one sample from each waiting request, those served longest ago first (up to half the batch),
then fills up with the oldest requests' next samples. The first part bounds unfairness: while fewer than
``max_batch / 2`` requests wait, each gets a sample into every model call or the next, so a small request behind a
large one waits for one call, not for the large request. The second
part delivers under overload: when more work arrives than the model can do before the clients give up, the oldest
requests complete in time, instead of every request being scored a little and none finishing.

A request may say how long its client will wait (``deadline_s``); samples not started by then are not started at all
(they come back ``failed``), so a server never spends its model on answers nobody will read. A request whose client
disconnected is dropped from the queue, not scored. A full queue is answered 503 at once, with ``Retry-After`` the
time the queue takes to drain, so a client waits or tries another server instead of counting the server as hung.

What a client can claim is bounded (see :class:`~.limits.ServerLimits`): body size (413 before the body is read),
bytes held across requests (taken as a body starts to arrive; a request waits for room, so memory stays flat),
queued samples (503), upload time and pauses (408), time without a complete request (the connection is closed),
samples per request and string fields (400), connections (``max_connections``, lowered below the open-file limit; at
the cap an idle connection makes room for a new one, see :mod:`.connections`). Framing errors are logged in one line,
accept errors and connections closed at the cap once per 10 s.

Every sample gets its own outcome (:class:`~.base.RewardResult`), as in-process scoring gives it: ``ok``; ``invalid``
when the utterance itself is at fault (empty, longer than ``max_audio_seconds``: valued at the plugin's minimum);
``failed`` when it cannot be scored for another reason (NaN audio, a prompt or text over the limits, a sample rate
the server does not take, the plugin raising on it, its deadline passing). When a model call fails, each request in
it is scored apart, then each sample, so a failure stays with the samples that cause it. The server binds to
127.0.0.1 unless told otherwise and never unpickles anything.

Endpoints: ``POST /score`` (JSON or msgpack, see :mod:`wire`), ``GET /health``, ``GET /info``.
"""

from __future__ import annotations

import asyncio
import logging
import math
import signal
import time
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from ..common.audio import ALLOWED_RATES, BadAudioError, check_audio
from .base import (
    INVALID,
    RewardPlugin,
    RewardResult,
    Sample,
    fields_for,
    plugin_requires,
    plugin_roles,
    plugin_sample_fields,
    screen,
)
from .connections import ACCEPT_BACKLOG, AcceptErrorLog, ConnectionCap, connection_cap
from .limits import ServerLimits
from .wire import (
    JSON,
    MAX_REASON_CHARS,
    MSGPACK,
    WireError,
    decode,
    encode,
    results_to_wire,
    sample_from_wire,
    upstream_from_wire,
)

logger = logging.getLogger(__name__)


@dataclass(eq=False)
class _Job:
    """One request on its way through the queue: the samples still to score (``todo``, indices into ``samples``)
    and a result slot per sample, filled at arrival for the samples refused then, the others as they are scored."""

    samples: list[Sample]
    upstream: dict[str, list[RewardResult]]
    results: list[RewardResult | None]
    todo: list[int]
    arrived: float
    deadline: float  # loop time after which its samples are not started
    future: asyncio.Future = field(repr=False)
    taken: int = 0  # samples of ``todo`` handed to model calls so far
    served: int = -1  # the latest model call that took one of its samples

    @property
    def waiting(self) -> int:
        return len(self.todo) - self.taken

    def finish_if_done(self) -> None:
        if not self.future.done() and all(r is not None for r in self.results):
            self.future.set_result(self.results)


class _Refused(Exception):
    """A request the server answers with a 4xx/5xx status and a reason (and headers such as Retry-After)."""

    def __init__(self, status: int, reason: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(reason)
        self.status, self.reason, self.headers = status, reason, headers or {}


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


def _failure(err: Exception) -> RewardResult:
    return RewardResult.failed(f"{type(err).__name__}: {err}"[:MAX_REASON_CHARS])


class RewardServer:
    def __init__(self, plugin: RewardPlugin, limits: ServerLimits | None = None, version: str = "") -> None:
        self.plugin, self.limits, self.version = plugin, limits or ServerLimits(), version
        self.requires = plugin_requires(plugin)
        self.sample_fields = plugin_sample_fields(plugin)
        self.batch_sizes: Counter[int] = Counter()  # size -> model calls; at most max_batch keys
        self.requests = 0
        self.expired_samples = 0  # samples not started because their request's deadline had passed
        self.started = time.time()
        self._pending: list[_Job] = []  # requests with samples not yet handed to a model call, oldest first
        self._queued = 0  # those samples
        self._calls = 0  # model calls so far
        self._seconds_per_sample = 0.0  # in the latest model call: how long the queue takes to drain
        self._arrived = asyncio.Event()
        self._budget = _ByteBudget(self.limits.max_inflight_bytes)

    # ------------------------------------------------------------------ batching
    async def _batcher(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            self._arrived.clear()
            self._expire(loop.time())
            if not self._pending:
                await self._arrived.wait()
                continue
            # what queued up while the model was busy has waited already: it goes at once
            wait = self._pending[0].arrived + self.limits.max_wait_ms / 1000 - loop.time()
            if self._queued < self.limits.max_batch and wait > 0:
                try:
                    await asyncio.wait_for(self._arrived.wait(), wait)
                except asyncio.TimeoutError:
                    pass
                continue
            await self._run(self._take_batch())

    def _expire(self, now: float) -> None:
        """Fail the samples whose request's deadline has passed before they were started: the client has gone."""
        for job in [j for j in self._pending if j.deadline <= now]:
            for index in job.todo[job.taken:]:
                job.results[index] = RewardResult.failed("not started before the request's deadline")
            self.expired_samples += job.waiting
            self._drop(job)
            job.finish_if_done()

    def _take_batch(self) -> list[tuple[_Job, int]]:
        """Up to ``max_batch`` samples and ``max_batch_audio_s`` seconds: one sample of each waiting request, those
        served longest ago first (half a batch at most), then the oldest requests' next samples."""
        batch: list[tuple[_Job, int]] = []
        seconds = 0.0
        self._calls += 1

        def take(job: _Job) -> bool:
            """Add the job's next sample if it fits (the first of a call always does)."""
            nonlocal seconds
            index = job.todo[job.taken]
            length = _seconds(job.samples[index])
            if batch and seconds + length > self.limits.max_batch_audio_s:
                return False
            batch.append((job, index))
            job.taken += 1
            job.served = self._calls
            self._queued -= 1
            seconds += length
            return True

        first_pass = sorted(self._pending[:max(1, self.limits.max_batch // 2)], key=lambda job: job.served)
        for job in first_pass:
            if len(batch) < self.limits.max_batch:
                take(job)
        for job in self._pending:
            while len(batch) < self.limits.max_batch and job.waiting and take(job):
                pass
        self._pending = [job for job in self._pending if job.waiting]
        return batch

    def _drop(self, job: _Job) -> None:
        """Take a request's unscored samples out of the queue (its client left, or its deadline passed)."""
        if job in self._pending:
            self._pending.remove(job)
            self._queued -= job.waiting
            job.taken = len(job.todo)

    async def _run(self, batch: list[tuple[_Job, int]]) -> None:
        self.batch_sizes[len(batch)] += 1
        started = time.perf_counter()
        outcomes = await asyncio.get_running_loop().run_in_executor(None, self._score_apart, batch)
        self._seconds_per_sample = (time.perf_counter() - started) / len(batch)
        for (job, index), outcome in zip(batch, outcomes):
            job.results[index] = _failure(outcome) if isinstance(outcome, Exception) else outcome
        for job in dict.fromkeys(job for job, _ in batch):
            job.finish_if_done()

    def _score_apart(self, batch: list[tuple[_Job, int]]) -> Sequence[RewardResult | Exception]:
        """One model call's outcome per sample; when the call fails, each request's part and then each sample is
        scored on its own, so that an error is pinned on the samples that cause it and no other request pays."""
        try:
            return self._call(batch)
        except Exception as err:  # noqa: BLE001 -- a plugin may raise anything; it becomes its sample's failure
            if len(batch) == 1:
                index = batch[0][1]
                log = logger.warning if isinstance(err, ValueError) else logger.exception
                log("reward %s cannot score sample %d of a request: %.300s", self.plugin.name, index, err)
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
    def _reply(self, request: web.Request, payload: Any, status: int = 200,
               headers: dict[str, str] | None = None) -> web.Response:
        kind = MSGPACK if MSGPACK in request.headers.get("Accept", request.content_type) else JSON
        return web.Response(body=encode(payload, kind), status=status, content_type=kind, headers=headers)

    async def score(self, request: web.Request) -> web.Response:
        try:
            return await self._score(request)
        except _Refused as refused:
            return self._reply(request, {"error": refused.reason}, refused.status, refused.headers)

    async def _score(self, request: web.Request) -> web.Response:
        kind = request.content_type
        if kind not in (JSON, MSGPACK):
            raise _Refused(415, f"Content-Type must be {JSON} or {MSGPACK}, got {kind!r}")
        limit = self.limits.max_request_bytes
        declared = request.content_length
        if declared is not None and declared > limit:
            raise _Refused(413, f"request body exceeds {limit} bytes; send fewer samples per request")
        claim, body = await self._receive(request)
        try:
            job = self._admit(self._decode(request, body))  # the body and its decoded form are freed once parsed
            del body
            return await self._wait_for(request, job)
        finally:
            self._budget.release(claim)

    async def _receive(self, request: web.Request) -> tuple[int, bytearray]:
        """The (decompressed) body and the bytes of ``max_inflight_mb`` it holds. The room is taken when the first
        bytes arrive, so a connection that declares a large body and sends nothing holds none; once it is taken, an
        upload may pause ``upload_idle_s`` at most (408), so one that sends a little and stops holds it briefly. Read
        here rather than by ``request.read()``, which keeps a copy for as long as the client holds the connection."""
        loop = asyncio.get_running_loop()
        give_up = loop.time() + self.limits.body_timeout_s
        body = bytearray(await self._next_chunk(request, give_up))
        if not body:
            return 0, body
        # a compressed or chunked body may grow up to the limit as it is read
        limit = self.limits.max_request_bytes
        claim = limit if request.content_length is None or "Content-Encoding" in request.headers else \
            request.content_length
        try:
            await asyncio.wait_for(self._budget.acquire(claim), give_up - loop.time())
        except asyncio.TimeoutError:
            raise _Refused(503, f"server busy: no room for {claim} more request bytes within "
                                f"{self.limits.body_timeout_s:g} s; try another server",
                           self._retry_after()) from None
        try:
            while True:
                if len(body) > limit:
                    raise _Refused(413, f"request body exceeds {limit} bytes; send fewer samples per request")
                chunk = await self._next_chunk(request, min(give_up, loop.time() + self.limits.upload_idle_s))
                if not chunk:
                    return claim, body
                body += chunk
        except BaseException:  # the room goes back whatever ended the upload, then the reason goes on
            self._budget.release(claim)
            raise

    async def _next_chunk(self, request: web.Request, until: float) -> bytes:
        try:
            return await asyncio.wait_for(request.content.readany(), until - asyncio.get_running_loop().time())
        except asyncio.TimeoutError:
            raise _Refused(408, f"request body not received within {self.limits.body_timeout_s:g} s, or paused "
                                f"for more than {self.limits.upload_idle_s:g} s") from None
        except web.RequestPayloadError as err:  # e.g. Content-Encoding: gzip on a body that is not gzip
            encoding = request.headers.get("Content-Encoding")
            what = f"does not match its Content-Encoding {encoding!r:.40}" if encoding else "is malformed"
            raise _Refused(400, f"the request body {what}: {err.__cause__ or err}"[:MAX_REASON_CHARS]) from None

    @staticmethod
    def _decode(request: web.Request, body: bytearray) -> Any:
        try:
            return decode(body, request.content_type)
        except WireError as err:
            raise _Refused(400, str(err)[:MAX_REASON_CHARS]) from None

    def _admit(self, payload: Any) -> _Job:
        """The request's job, its refused samples' results filled in; queued unless the queue is full."""
        try:
            if not isinstance(payload, dict) or not isinstance(payload.get("samples"), list):
                raise WireError("body must be an object with a 'samples' list")
            raw = payload["samples"]
            if not raw:
                raise WireError("'samples' is empty")
            if len(raw) > self.limits.max_samples_per_request:
                raise _Refused(413, f"{len(raw)} samples in one request; the limit is "
                                    f"{self.limits.max_samples_per_request}")
            samples = [self._declared_fields(sample_from_wire(item, i), i) for i, item in enumerate(raw)]
            upstream = upstream_from_wire(payload.get("upstream"), len(samples))
            deadline_s = payload.get("deadline_s", math.inf)
            if not isinstance(deadline_s, (int, float)) or isinstance(deadline_s, bool) or not deadline_s > 0:
                raise WireError(f"'deadline_s' must be a number of seconds > 0, got {deadline_s!r:.40}")
        except WireError as err:
            raise _Refused(400, str(err)[:MAX_REASON_CHARS]) from None
        missing = [n for n in self.requires if n not in upstream]
        if missing:
            raise _Refused(422, f"reward {self.plugin.name!r} needs upstream results {missing}")
        results = [self._refusal(i, s) for i, s in enumerate(samples)]
        todo = [i for i, r in enumerate(results) if r is None]
        if self._queued + len(todo) > self.limits.max_queued_samples:
            raise _Refused(503, f"server busy: {self._queued} samples queued (limit "
                                f"{self.limits.max_queued_samples}); try again later or another server",
                           self._retry_after())
        loop = asyncio.get_running_loop()
        job = _Job(samples, upstream, results, todo, loop.time(), loop.time() + min(deadline_s, 1e9),
                   loop.create_future())
        self.requests += 1
        if todo:
            self._pending.append(job)
            self._queued += len(todo)
            self._arrived.set()
        else:
            job.finish_if_done()
        return job

    def _declared_fields(self, sample: Sample, index: int) -> Sample:
        """``sample`` with the fields the plugin declares, checked; a field it does not declare is refused, naming
        the fields it does (a client sends only those, so a stray one is a mistake, such as a misspelt column)."""
        where = f"sample {index}"
        unknown = sorted(set(sample.fields) - set(self.sample_fields))
        if unknown:
            declared = ", ".join(f"{n} ({k.__name__})" for n, k in self.sample_fields.items()) or "none"
            raise WireError(f"{where}: field(s) {unknown} are not declared by reward {self.plugin.name!r}, which "
                            f"declares: {declared}")
        try:
            sample.fields = fields_for(self.plugin.name, self.sample_fields, sample, where)
        except ValueError as err:
            raise WireError(str(err)) from None
        return sample

    def _retry_after(self) -> dict[str, str]:
        """When to ask again: the time the queued samples take at the latest call's speed (whole seconds, >= 1)."""
        return {"Retry-After": str(min(60, max(1, math.ceil(self._queued * self._seconds_per_sample))))}

    async def _wait_for(self, request: web.Request, job: _Job) -> web.Response:
        try:
            results = await job.future
        finally:
            self._drop(job)  # a no-op unless the client went away (the handler is cancelled then)
        return self._reply(request, {"results": results_to_wire(results)})

    def _refusal(self, index: int, sample: Sample) -> RewardResult | None:
        """The result of a sample that is not to reach the model (None when it is). First what in-process scoring
        says of it (:func:`~.base.screen`: empty or too long is the policy's fault, ``invalid``; NaN audio the
        synthesis pipeline's, ``failed``), so a sample gets the same status wherever it is scored; then ``invalid``
        when longer than this server takes, ``failed`` when what came with it is at fault (its rate, prompt, text)."""
        where = f"sample {index}"
        if sample.sample_rate not in ALLOWED_RATES:  # before screen(), which divides by it
            return RewardResult.failed(f"{where} audio has sample rate {sample.sample_rate}; expected one of "
                                       f"{ALLOWED_RATES}")
        early = screen(sample)
        if early is not None:
            return RewardResult.invalid(self.plugin, early.reason) if early.status == INVALID else early
        try:
            check_audio(sample.audio, sample.sample_rate, what=f"{where} audio",
                        max_seconds=self.limits.max_audio_seconds)
        except BadAudioError as err:
            return RewardResult.invalid(self.plugin, str(err))
        if sample.prompt_audio is not None:
            try:
                check_audio(sample.prompt_audio, sample.prompt_sample_rate or 0, what=f"{where} prompt_audio",
                            max_seconds=self.limits.max_audio_seconds)
            except BadAudioError as err:
                return RewardResult.failed(str(err))
        if len(sample.text) > self.limits.max_text_chars:
            return RewardResult.failed(f"{where} text has {len(sample.text)} characters; the limit is "
                                       f"{self.limits.max_text_chars}")
        return None

    async def health(self, request: web.Request) -> web.Response:
        return self._reply(request, {"status": "ok"})

    async def info(self, request: web.Request) -> web.Response:
        batches = sum(self.batch_sizes.values())
        return self._reply(request, {
            "plugin": self.plugin.name, "class": type(self.plugin).__qualname__, "version": self.version,
            "requires": list(self.requires), "limits": asdict(self.limits), "requests": self.requests,
            "sample_fields": {name: kind.__name__ for name, kind in self.sample_fields.items()},
            "roles": plugin_roles(self.plugin),
            "batches": batches, "batch_size_histogram": {str(k): v for k, v in sorted(self.batch_sizes.items())},
            "mean_batch_size": sum(k * v for k, v in self.batch_sizes.items()) / batches if batches else 0.0,
            "max_batch_size_seen": max(self.batch_sizes, default=0), "queued_samples": self._queued,
            "expired_samples": self.expired_samples, "held_request_bytes": self._budget.used,
            "uptime_s": time.time() - self.started,
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


class _OneLineFramingErrors(logging.Filter):
    """A malformed HTTP message (bad framing, a header too long) is the sender's fault: one line naming it, not the
    13-line traceback aiohttp logs for each."""

    def filter(self, record: logging.LogRecord) -> bool:
        err = record.exc_info[1] if record.exc_info else None
        if isinstance(err, HttpProcessingError):
            record.msg, record.exc_info = f"{record.getMessage()}: {type(err).__name__}: {err.message:.200}", None
            record.args = ()
        return True


def serve(plugin: RewardPlugin, host: str = "127.0.0.1", port: int = 8100, limits: ServerLimits | None = None,
          version: str = "") -> None:
    """Serve ``plugin`` until SIGTERM or SIGINT, then let the requests in progress finish (60 s at most)."""
    if host not in ("127.0.0.1", "localhost", "::1"):
        logger.warning("reward server %s listens on %s: every host that can reach it may send work",
                       plugin.name, host)
    logging.getLogger("aiohttp.server").addFilter(_OneLineFramingErrors())
    asyncio.run(_serve_until_stopped(RewardServer(plugin, limits, version), host, port))


async def _serve_until_stopped(server: RewardServer, host: str, port: int) -> None:
    """aiohttp's ``run_app``, with connections made through a :class:`~.connections.ConnectionCap` (``run_app`` has
    no hook for that)."""
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(AcceptErrorLog())
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    cap = ConnectionCap(connection_cap(server.limits.max_connections))
    app = server.app()
    app.middlewares.append(cap.track_requests)
    # a connection without a complete request (half-sent headers, an idle keep-alive) is closed after
    # header_timeout_s, so a flood of them cannot hold the server's file descriptors
    runner = web.AppRunner(app, keepalive_timeout=server.limits.header_timeout_s)
    await runner.setup()
    try:
        listener = await loop.create_server(cap.protocol_factory(runner.server), host, port, backlog=ACCEPT_BACKLOG)
        logger.info("serving reward %s on http://%s:%d", server.plugin.name, host, port)
        await stop.wait()
        listener.close()  # no new connections; runner.cleanup lets the requests in progress finish
    finally:
        await runner.cleanup()
