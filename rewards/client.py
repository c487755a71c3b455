"""The reward-server client: spread over several servers, bounded fail-over, checked replies, never a silent 0.

A call's samples go out as chunks of ``max_samples_per_request``, concurrently; chunk k of a call starts at its own
server, so concurrent chunks spread over the servers. A failed attempt -- connection refused, no answer within
``timeout_s``, a 5xx/408/429, a reply that is not one finite result per sample -- is logged with the server's URL, and
the chunk moves to the server it has asked least in this call, healthy servers first (a backoff is waited only before
asking a server again). A server that timed out is not asked again in the same call, and a failed server is tried
after the healthy ones for ``cooldown_s`` (longer after each further failure), so a hung server costs one timeout in
the call that finds it and none in the calls that follow: with k hung servers a call takes at most k * ``timeout_s``.
A 4xx means the request itself is wrong: it is raised at once as :class:`RewardRequestError`, never retried. When no
attempt is left, :class:`RewardServerError` names each server asked, once, with its last failure.

All calls of a client share one aiohttp session (keep-alive connections, no handshake per call) on the client's own
event-loop thread, so :meth:`RewardClient.score` works from plain code and from inside a running event loop alike,
and :meth:`RewardClient.score_async` from any loop.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import math
import os
import threading
import time
import weakref
from collections.abc import Coroutine, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import aiohttp

from .base import RewardResult, Sample
from .wire import ENCODINGS, JSON, MSGPACK, WireError, decode, encode, request_payload, results_from_wire

logger = logging.getLogger(__name__)

_T = TypeVar("_T")
_RETRYABLE = frozenset({408, 429})  # the server's state, not the request, is at fault: another server may answer


class RewardServerError(ConnectionError):
    """No configured server could score the request; the message names each server asked and why it failed.

    A ``ConnectionError``: the reward service is unavailable, so a command line can report it in one line, as it
    does other unreachable services, without importing this module."""


class RewardRequestError(ValueError):
    """A server refused the request as malformed or too large (4xx): retrying would not help."""


class _FailedAttempt(Exception):
    """A server answered, but not with results: an error status worth trying elsewhere, or a malformed reply."""


@dataclass
class ClientStats:
    requests: int = 0
    failed_attempts: int = 0
    failures_by_url: dict[str, int] = field(default_factory=dict)


class _LoopThread:
    """An event loop running in a daemon thread, with the one aiohttp session every call of a client uses."""

    def __init__(self, timeout: aiohttp.ClientTimeout) -> None:
        self.timeout, self.pid = timeout, os.getpid()
        self.loop = asyncio.new_event_loop()
        self.session: aiohttp.ClientSession | None = None
        threading.Thread(target=self._run, name="reward-client", daemon=True).start()

    def _run(self) -> None:
        try:
            self.loop.run_forever()
        finally:
            self.loop.close()

    def submit(self, coro: Coroutine[Any, Any, _T]) -> concurrent.futures.Future[_T]:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def http(self) -> aiohttp.ClientSession:
        """The session, made on first use inside the loop it belongs to."""
        if self.session is None:
            self.session = aiohttp.ClientSession(timeout=self.timeout)
        return self.session

    def stop(self) -> None:
        """Close the session and stop the loop, without waiting: safe from any thread, the loop's own included."""
        async def close() -> None:
            if self.session is not None:
                await self.session.close()
            self.loop.stop()

        if not self.loop.is_closed():
            self.loop.call_soon_threadsafe(self.loop.create_task, close())


class RewardClient:
    def __init__(self, urls: Sequence[str], *, timeout_s: float = 120.0, connect_timeout_s: float = 5.0,
                 retries: int = 3, backoff_s: float = 0.5, cooldown_s: float = 30.0,
                 max_samples_per_request: int = 64, encoding: str = "f32") -> None:
        if not urls:
            raise ValueError("RewardClient needs at least one server URL")
        if not timeout_s > 0 or not connect_timeout_s > 0 or retries < 0 or backoff_s < 0 or cooldown_s < 0:
            raise ValueError("reward client: timeout_s and connect_timeout_s must be > 0; retries, backoff_s and "
                             "cooldown_s >= 0")
        if max_samples_per_request < 1:
            raise ValueError(f"max_samples_per_request must be >= 1, got {max_samples_per_request}")
        if encoding not in ENCODINGS:
            raise ValueError(f"encoding must be one of {list(ENCODINGS)}, got {encoding!r}")
        self.urls = [u.rstrip("/") for u in urls]
        self.timeout_s = timeout_s
        # aiohttp rounds timeouts over ceil_threshold up to a whole second: fail-over time is kept exact instead
        self.timeout = aiohttp.ClientTimeout(total=timeout_s, sock_connect=min(connect_timeout_s, timeout_s),
                                             ceil_threshold=math.inf)
        self.retries, self.backoff_s, self.cooldown_s = retries, backoff_s, cooldown_s
        self.chunk, self.encoding = max_samples_per_request, encoding
        self.stats = ClientStats()
        self._turn = 0  # where the next chunk starts, so that concurrent chunks spread over the servers
        self._strikes: dict[str, tuple[float, int]] = {}  # url -> (tried after the healthy ones until, failures)
        self._lock = threading.Lock()
        self._thread: _LoopThread | None = None
        self._finalizer: weakref.finalize | None = None

    # ------------------------------------------------------------------ the loop thread
    def _runner(self) -> _LoopThread:
        with self._lock:
            if self._thread is None or self._thread.pid != os.getpid():  # started lazily, again in a forked child
                self._thread = _LoopThread(self.timeout)
                self._finalizer = weakref.finalize(self, self._thread.stop)
            return self._thread

    def close(self) -> None:
        """Close the connections and stop the loop thread; a later call starts them again."""
        with self._lock:
            if self._finalizer is not None:
                self._finalizer()
            self._thread = self._finalizer = None

    # ------------------------------------------------------------------ scoring
    def score(self, samples: Sequence[Sample],
              upstream: Mapping[str, Sequence[RewardResult]] | None = None) -> list[RewardResult]:
        runner = self._runner()
        return runner.submit(self._score(runner, samples, upstream)).result()

    async def score_async(self, samples: Sequence[Sample],
                          upstream: Mapping[str, Sequence[RewardResult]] | None = None) -> list[RewardResult]:
        runner = self._runner()
        return await asyncio.wrap_future(runner.submit(self._score(runner, samples, upstream)))

    async def _score(self, runner: _LoopThread, samples: Sequence[Sample],
                     upstream: Mapping[str, Sequence[RewardResult]] | None) -> list[RewardResult]:
        """Runs on the client's loop thread, like everything that touches the session and the server order."""
        session = runner.http()
        self.stats.requests += 1
        chunks = []
        for start in range(0, len(samples), self.chunk):
            part = {k: list(v)[start:start + self.chunk] for k, v in (upstream or {}).items()}
            body = encode(request_payload(samples[start:start + self.chunk], part, self.encoding), MSGPACK)
            chunks.append(self._score_chunk(session, body, len(samples[start:start + self.chunk]), self._turn))
            self._turn += 1
        results = await asyncio.gather(*chunks)
        return [r for chunk in results for r in chunk]

    def _order(self, first: int) -> list[str]:
        """The servers starting at ``first``, those that failed lately moved to the end."""
        now = time.monotonic()
        rotated = self.urls[first % len(self.urls):] + self.urls[:first % len(self.urls)]
        return sorted(rotated, key=lambda url: self._strikes.get(url, (0.0, 0))[0] > now)

    def _failed(self, url: str) -> None:
        strikes = self._strikes.get(url, (0.0, 0))[1] + 1
        self._strikes[url] = (time.monotonic() + self.cooldown_s * min(strikes, 10), strikes)
        self.stats.failed_attempts += 1
        self.stats.failures_by_url[url] = self.stats.failures_by_url.get(url, 0) + 1

    async def _score_chunk(self, session: aiohttp.ClientSession, body: bytes, n: int,
                           first: int) -> list[RewardResult]:
        started = time.monotonic()
        order = self._order(first)
        asked = dict.fromkeys(order, 0)
        errors: dict[str, str] = {}  # url -> last failure, in the order first asked
        hung: set[str] = set()  # servers that timed out: not asked again in this call
        for attempt in range(self.retries + 1):
            candidates = [u for u in order if u not in hung]
            if not candidates:
                break
            url = min(candidates, key=asked.__getitem__)  # the least asked, healthy ones first
            if asked[url]:
                await asyncio.sleep(self.backoff_s * 2 ** (asked[url] - 1))
            asked[url] += 1
            try:
                return await self._post(session, url, body, n)
            except asyncio.TimeoutError as err:  # aiohttp's connect timeout says so; the total one says nothing
                reason = str(err) or f"no answer within {self.timeout_s:g} s"
                hung.add(url)
            except (aiohttp.ClientError, _FailedAttempt, WireError) as err:
                reason = f"{type(err).__name__}: {err}" if str(err) else type(err).__name__
            errors[url] = reason
            self._failed(url)
            logger.warning("reward server %s failed (attempt %d/%d): %s", url, attempt + 1, self.retries + 1, reason)
        tried = "; ".join(f"{url} ({asked[url]}x): {reason}" if asked[url] > 1 else f"{url}: {reason}"
                          for url, reason in errors.items())
        raise RewardServerError(f"no reward server could score {n} samples ({sum(asked.values())} attempts in "
                                f"{time.monotonic() - started:.1f} s): {tried}")

    async def _post(self, session: aiohttp.ClientSession, url: str, body: bytes, n: int) -> list[RewardResult]:
        async with session.post(f"{url}/score", data=body,
                                headers={"Content-Type": MSGPACK, "Accept": MSGPACK}) as response:
            raw = await response.read()
            status, kind = response.status, response.content_type
        if kind not in (JSON, MSGPACK):
            raise _FailedAttempt(f"HTTP {status} with Content-Type {kind!r}, not JSON or msgpack: "
                                 f"{raw[:200].decode(errors='replace')!r}")
        payload = decode(raw, kind)
        if status == 200:
            return results_from_wire(payload.get("results") if isinstance(payload, dict) else payload, n,
                                     f"reply of {url}")
        reason = payload.get("error") if isinstance(payload, dict) else payload
        detail = f" {payload['samples']}" if isinstance(payload, dict) and "samples" in payload else ""
        if 400 <= status < 500 and status not in _RETRYABLE:
            raise RewardRequestError(f"{url} refused the request ({status}): {reason}{detail}")
        raise _FailedAttempt(f"HTTP {status}: {reason}{detail}")


class RemoteReward:
    """A reward plugin whose model runs behind one or more reward servers; same interface as in-process."""

    def __init__(self, name: str, urls: Sequence[str], requires: Sequence[str] = (), **client_settings: Any) -> None:
        self.name, self.requires = name, tuple(requires)
        self.client = RewardClient(urls, **client_settings)

    def score(self, samples: Sequence[Sample],
              upstream: Mapping[str, Sequence[RewardResult]] | None = None) -> list[RewardResult]:
        return self.client.score(samples, upstream)
