"""The reward-server client: async, spread over several servers, retried with backoff, never a silent 0.

A failed attempt (connection refused, timeout, 5xx) is logged with the server's URL and retried on the next server
after a backoff; a 4xx means the request itself is wrong, so it is raised at once with the server's reason. When
every attempt fails, :class:`RewardServerError` names the servers and what each said.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import aiohttp

from .base import RewardResult, Sample
from .wire import MSGPACK, decode, encode, request_payload

logger = logging.getLogger(__name__)


class RewardServerError(RuntimeError):
    """No configured server could score the request."""


class RewardRequestError(ValueError):
    """A server refused the request as malformed or too large (4xx): retrying would not help."""


@dataclass
class ClientStats:
    requests: int = 0
    failed_attempts: int = 0
    failures_by_url: dict[str, int] = field(default_factory=dict)


class RewardClient:
    def __init__(self, urls: Sequence[str], *, timeout_s: float = 120.0, retries: int = 3, backoff_s: float = 0.5,
                 max_samples_per_request: int = 64, encoding: str = "f32") -> None:
        if not urls:
            raise ValueError("RewardClient needs at least one server URL")
        self.urls = [u.rstrip("/") for u in urls]
        self.timeout = aiohttp.ClientTimeout(total=timeout_s)
        self.retries, self.backoff_s = retries, backoff_s
        self.chunk, self.encoding = max_samples_per_request, encoding
        self._next = itertools.cycle(range(len(self.urls)))
        self.stats = ClientStats()

    async def _post(self, session: aiohttp.ClientSession, url: str, body: bytes) -> list[RewardResult]:
        async with session.post(f"{url}/score", data=body,
                                headers={"Content-Type": MSGPACK, "Accept": MSGPACK}) as response:
            raw = await response.read()
            payload = decode(raw, MSGPACK) if response.content_type == MSGPACK else {"error": raw[:500].decode(
                errors="replace")}
            if 400 <= response.status < 500:
                raise RewardRequestError(f"{url} refused the request ({response.status}): {payload.get('error')}"
                                         + (f" {payload['samples']}" if "samples" in payload else ""))
            if response.status != 200:
                raise aiohttp.ClientResponseError(response.request_info, (), status=response.status,
                                                  message=str(payload.get("error")))
            return [RewardResult(float(r["value"]), dict(r.get("info") or {})) for r in payload["results"]]

    async def _score_chunk(self, session: aiohttp.ClientSession, body: bytes) -> list[RewardResult]:
        errors: list[str] = []
        for attempt in range(self.retries + 1):
            url = self.urls[next(self._next)]
            try:
                return await self._post(session, url, body)
            except (aiohttp.ClientError, asyncio.TimeoutError) as err:
                reason = f"{type(err).__name__}: {err}" if str(err) else type(err).__name__
                errors.append(f"{url}: {reason}")
                self.stats.failed_attempts += 1
                self.stats.failures_by_url[url] = self.stats.failures_by_url.get(url, 0) + 1
                logger.warning("reward server %s failed (attempt %d/%d): %s", url, attempt + 1, self.retries + 1,
                               reason)
                if attempt < self.retries:
                    await asyncio.sleep(self.backoff_s * 2**attempt)
        raise RewardServerError(f"all {self.retries + 1} attempts failed; " + "; ".join(errors))

    async def score_async(self, samples: Sequence[Sample],
                          upstream: Mapping[str, Sequence[RewardResult]] | None = None) -> list[RewardResult]:
        self.stats.requests += 1
        bodies = []
        for start in range(0, len(samples), self.chunk):
            part = {k: list(v)[start:start + self.chunk] for k, v in (upstream or {}).items()}
            bodies.append(encode(request_payload(samples[start:start + self.chunk], part, self.encoding), MSGPACK))
        async with aiohttp.ClientSession(timeout=self.timeout) as session:
            chunks = await asyncio.gather(*(self._score_chunk(session, b) for b in bodies))
        return [r for chunk in chunks for r in chunk]

    def score(self, samples: Sequence[Sample],
              upstream: Mapping[str, Sequence[RewardResult]] | None = None) -> list[RewardResult]:
        return asyncio.run(self.score_async(samples, upstream))


class RemoteReward:
    """A reward plugin whose model runs behind one or more reward servers; same interface as in-process."""

    def __init__(self, name: str, urls: Sequence[str], requires: Sequence[str] = (), **client_settings) -> None:
        self.name, self.requires = name, tuple(requires)
        self.client = RewardClient(urls, **client_settings)

    def score(self, samples: Sequence[Sample],
              upstream: Mapping[str, Sequence[RewardResult]] | None = None) -> list[RewardResult]:
        return self.client.score(samples, upstream)
