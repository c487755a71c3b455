"""The reward-server client: spread over several servers, bounded fail-over, checked replies, never a silent 0.

A call's samples go out as chunks of ``max_samples_per_request``, concurrently; chunk k of a call starts at its own
server, so concurrent chunks spread over the servers. Every sample comes back as a :class:`~.base.RewardResult`:
``ok``, ``invalid`` (the server found the utterance at fault) or ``failed`` (not scored, with the reason), so one
unscoreable sample or one chunk that no server answered costs those samples, not the call.

A failed attempt -- connection refused, no answer within ``timeout_s``, a 5xx, a redirect, a reply that is not one
result per sample or larger than the samples can need -- is logged with the server's URL and counted in
:attr:`RewardClient.stats`, and the chunk moves to the server it has asked least in this call, healthy servers first
(a backoff is waited only before asking a server again). A server that timed out is not asked again in the same call,
and a failed server is tried after the healthy ones for ``cooldown_s`` (longer after each further failure), so a hung
server costs one timeout in the call that finds it and none in the calls that follow.

A busy server (503 or 429) is not a failed one: the chunk asks the other servers first, and asks the busy one again
after its ``Retry-After``, without spending a retry, for as long as ``timeout_s`` from the chunk's start allows. Each
request tells the server how long its client will wait, so a server under overload does not start work nobody will
read, and answers the samples it could not start as ``failed`` before the client gives up.

A 4xx means the request itself is wrong (a caller's bug): it is raised at once as :class:`RewardRequestError`, never
retried, and the call's other chunks are cancelled, which takes their samples off the servers' queues. When no chunk
of a call got an answer, :class:`RewardServerError` names each server asked, once, with its last failure.

All calls of a client share one aiohttp session (keep-alive connections, no handshake per call) on the client's own
event-loop thread, so :meth:`RewardClient.score` works from plain code and from inside a running event loop alike,
and :meth:`RewardClient.score_async` from any loop.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import functools
import logging
import math
import os
import threading
import time
import urllib.parse
import weakref
from collections.abc import Coroutine, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import aiohttp

from ..common.settings import from_dict, settings_class
from .base import RewardResult, Sample, plugin_roles, plugin_sample_fields, registered_plugin
from .wire import (
    ENCODINGS,
    JSON,
    MAX_REASON_CHARS,
    MSGPACK,
    WireError,
    decode,
    encode,
    request_payload,
    results_from_wire,
)

logger = logging.getLogger(__name__)

_T = TypeVar("_T")
_BUSY_STATUSES = frozenset({429, 503})  # a healthy server without room now: wait for it or ask another
_BUSY = "busy"
_MIN_BUSY_PAUSE_S = 0.05  # however soon a busy server says to come back
_DEADLINE_SHARE = 0.9  # of timeout_s: what a request tells the server, so its answer arrives before the client gives up
_MAX_REPLY_BYTES_PER_SAMPLE = 64 * 2**10  # a result with its info and spans; a reply is capped by its samples
_MAX_REPLY_BYTES_BASE = 2**20


class RewardServerError(ConnectionError):
    """No configured server could score the request; the message names each server asked and why it failed.

    A ``ConnectionError``: the reward service is unavailable, so a command line can report it in one line, as it
    does other unreachable services, without importing this module."""

    def failed_results(self, n: int) -> list[RewardResult]:
        return [RewardResult.failed(str(self)[:MAX_REASON_CHARS]) for _ in range(n)]


class RewardRequestError(ValueError):
    """A server refused the request as malformed or too large (4xx): retrying would not help."""


class _FailedAttempt(Exception):
    """A server answered, but not with results: an error status worth trying elsewhere, or a malformed reply."""


class _Busy(Exception):
    """A healthy server with no room now (503, 429): asked again after ``retry_after_s``, if it said."""

    def __init__(self, reason: str, retry_after_s: float | None) -> None:
        super().__init__(reason)
        self.retry_after_s = retry_after_s


@dataclass
class ClientStats:
    requests: int = 0
    failed_attempts: int = 0
    busy_answers: int = 0  # 503/429 answers, waited out or taken elsewhere; not failures
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
            payload = request_payload(samples[start:start + self.chunk], part, self.encoding)
            chunks.append(asyncio.ensure_future(self._score_chunk(session, payload, self._turn)))
            self._turn += 1
        try:
            outcomes = await asyncio.gather(*chunks)
        except BaseException:  # a caller's bug in one chunk, or the caller gave up: the others leave the servers
            for chunk in chunks:
                chunk.cancel()
            raise
        if all(isinstance(outcome, RewardServerError) for outcome in outcomes):
            raise outcomes[0]  # no server answered at all: the reward service is down, not some samples
        return [result for outcome, start in zip(outcomes, range(0, len(samples), self.chunk))
                for result in (outcome.failed_results(len(samples[start:start + self.chunk]))
                               if isinstance(outcome, RewardServerError) else outcome)]

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

    async def _score_chunk(self, session: aiohttp.ClientSession, payload: dict[str, Any],
                           first: int) -> list[RewardResult] | RewardServerError:
        """The chunk's results, or the error saying why no server scored it. Failures spend ``retries``; busy
        answers do not, but no busy server is waited for past ``timeout_s`` from the start."""
        n = len(payload["samples"])
        started = time.monotonic()
        give_up = started + self.timeout_s  # for busy servers; a hung one costs one timeout_s of its own
        order = self._order(first)
        asked = dict.fromkeys(order, 0)
        not_before = dict.fromkeys(order, started)  # a backoff or a Retry-After
        errors: dict[str, str] = {}  # url -> last failure, in the order first asked
        hung: set[str] = set()  # servers that timed out: not asked again in this call
        # the server stops starting this request's samples a little before the client stops waiting
        body = encode({**payload, "deadline_s": _DEADLINE_SHARE * self.timeout_s}, MSGPACK)
        failures = 0
        while failures <= self.retries:
            candidates = [u for u in order if u not in hung]
            if not candidates:
                break
            url = min(candidates, key=lambda u: (asked[u], not_before[u]))  # the least asked, healthy ones first
            if errors.get(url, "").startswith(_BUSY) and not_before[url] > give_up:
                break  # busy, and it will not be free before this chunk's time is up
            await asyncio.sleep(max(0.0, not_before[url] - time.monotonic()))
            asked[url] += 1
            try:
                return await self._post(session, url, body, n)
            except _Busy as busy:
                self.stats.busy_answers += 1
                errors[url] = f"{_BUSY} ({busy})"
                pause = busy.retry_after_s if busy.retry_after_s is not None else self.backoff_s * 2 ** (asked[url] - 1)
                not_before[url] = time.monotonic() + max(pause, _MIN_BUSY_PAUSE_S)
                logger.info("reward server %s is busy; asking again in %.1f s at the earliest", url,
                            not_before[url] - time.monotonic())
                continue
            except asyncio.TimeoutError as err:  # aiohttp's connect timeout says so; the total one says nothing
                reason = str(err) or f"no answer within {self.timeout_s:g} s"
                hung.add(url)
            except (aiohttp.ClientError, _FailedAttempt, WireError) as err:
                reason = f"{type(err).__name__}: {err}" if str(err) else type(err).__name__
            failures += 1
            errors[url] = reason
            not_before[url] = time.monotonic() + self.backoff_s * 2 ** (asked[url] - 1)
            self._failed(url)
            logger.warning("reward server %s failed (attempt %d/%d): %.300s", url, failures, self.retries + 1,
                           reason)
        tried = "; ".join(f"{url} ({asked[url]}x): {reason}" if asked[url] > 1 else f"{url}: {reason}"
                          for url, reason in errors.items())
        error = RewardServerError(f"no reward server could score {n} samples ({sum(asked.values())} attempts in "
                                  f"{time.monotonic() - started:.1f} s): {tried}")
        logger.warning("%.1000s", error)
        return error

    async def _post(self, session: aiohttp.ClientSession, url: str, body: bytes, n: int) -> list[RewardResult]:
        async with session.post(f"{url}/score", data=body, allow_redirects=False,
                                headers={"Content-Type": MSGPACK, "Accept": MSGPACK}) as response:
            status, kind = response.status, response.content_type
            raw = await _read_capped(response, _MAX_REPLY_BYTES_PER_SAMPLE * n + _MAX_REPLY_BYTES_BASE)
            retry_after = _seconds_or_none(response.headers.get("Retry-After"))
        if 300 <= status < 400:
            raise _FailedAttempt(f"HTTP {status}: a reward server does not redirect; redirects are not followed")
        if kind not in (JSON, MSGPACK):
            raise _FailedAttempt(f"HTTP {status} with Content-Type {kind!r}, not JSON or msgpack: "
                                 f"{raw[:200].decode(errors='replace')!r}")
        payload = decode(raw, kind)
        if status == 200:
            return results_from_wire(payload.get("results") if isinstance(payload, dict) else payload, n,
                                     f"reply of {url}")
        reason = f"{payload.get('error') if isinstance(payload, dict) else payload!s:.300}"
        if status in _BUSY_STATUSES:
            raise _Busy(f"HTTP {status}: {reason}", retry_after)
        if 400 <= status < 500 and status != 408:
            raise RewardRequestError(f"{url} refused the request ({status}): {reason}")
        raise _FailedAttempt(f"HTTP {status}: {reason}")


async def _read_capped(response: aiohttp.ClientResponse, limit: int) -> bytes:
    """The reply's body, or :class:`_FailedAttempt` as soon as it is larger than ``limit``: a broken or hostile
    server cannot make the client hold more than its samples' results can take."""
    if response.content_length is not None and response.content_length > limit:
        raise _FailedAttempt(f"reply of {response.content_length} bytes; at most {limit} expected")
    body = bytearray()
    async for chunk in response.content.iter_any():
        body += chunk
        if len(body) > limit:
            raise _FailedAttempt(f"reply larger than the {limit} bytes expected")
    return bytes(body)


def _seconds_or_none(header: str | None) -> float | None:
    """A ``Retry-After`` in seconds (the HTTP-date form is not used by reward servers), capped at 60 s."""
    try:
        seconds = float(header) if header is not None else math.nan
    except ValueError:
        return None
    return min(seconds, 60.0) if seconds >= 0 else None


class RemoteReward:
    """A reward plugin whose model runs behind one or more reward servers; same interface as in-process.

    ``min_value`` is what the reward gives an ``invalid`` sample (the served plugin's minimum; 0.0 unless the
    config says otherwise). ``sample_fields`` (sent with each sample, see :func:`~.base.plugin_sample_fields`) and
    ``roles`` (read by the evaluation tables, see :func:`~.base.plugin_roles`) are those the config gives, else those
    the plugin registered under ``name`` declares, so a served ``cer`` fills the error-rate column as an in-process
    one does. Its settings are checked when the recipe loads, before any server is asked."""

    def __init__(self, name: str, urls: Sequence[str], requires: Sequence[str] = (), min_value: float = 0.0,
                 sample_fields: Mapping[str, Any] | None = None, roles: Mapping[str, str] | None = None,
                 **client_settings: Any) -> None:
        client_settings = validate_remote_settings(name, urls, client_settings)
        if not isinstance(min_value, (int, float)) or isinstance(min_value, bool) or not math.isfinite(min_value):
            raise ValueError(f"remote reward {name!r}: min_value must be a finite number, got {min_value!r}")
        self.name, self.requires, self.min_value = name, tuple(requires), float(min_value)
        served = registered_plugin(name) if sample_fields is None or roles is None else None
        self.sample_fields = getattr(served, "sample_fields", {}) if sample_fields is None else sample_fields
        self.roles = getattr(served, "roles", {}) if roles is None else roles
        self.sample_fields, self.roles = plugin_sample_fields(self), plugin_roles(self)  # checked as for a plugin
        self.client = RewardClient(urls, **client_settings)

    def score(self, samples: Sequence[Sample],
              upstream: Mapping[str, Sequence[RewardResult]] | None = None) -> list[RewardResult]:
        return self.client.score(samples, upstream)


def validate_remote_settings(name: str, urls: Any, settings: Mapping[str, Any]) -> dict[str, Any]:
    """``settings`` as :class:`RewardClient` takes them (a number YAML read as a string made a float); a ValueError
    saying what to fix unless ``urls`` is a list of http(s) server URLs and ``settings`` read as a config section of
    :class:`RewardClient`'s and :class:`RemoteReward`'s parameters (a typo named with the closest, a value of the
    wrong type refused)."""
    where = f"remote reward {name!r}"
    if not isinstance(urls, (list, tuple)) or not urls:
        raise ValueError(f"{where}: urls must be a list of server URLs such as [http://127.0.0.1:8100], "
                         f"got {urls!r:.200}")
    for url in urls:
        parts = urllib.parse.urlsplit(url) if isinstance(url, str) else None
        if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"{where}: {url!r:.200} is not an http:// or https:// server URL "
                             "(such as http://127.0.0.1:8100)")
    checked = from_dict(_remote_settings_class(), {"name": name, "urls": urls, **settings}, where)
    return {key: getattr(checked, key) for key in settings}


@functools.cache
def _remote_settings_class() -> type:
    """RewardClient's settings and those RemoteReward takes itself (``requires``, ``min_value``, ``sample_fields``,
    ``roles``) as one section: what a remote entry of a reward list may hold."""
    return dataclasses.make_dataclass("RemoteRewardSettings", [], kw_only=True,
                                      bases=(settings_class(RemoteReward), settings_class(RewardClient)))
