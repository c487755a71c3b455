"""How many connections a reward server holds, and how it reports the ones it cannot take.

Every connection holds a file descriptor. At the process's limit (``ulimit -n``) the server can take no connection
(the event loop reports EMFILE on each accept and pauses accepting), open no model file and start no worker
process: 1,100 half-sent headers under ``ulimit -n 1024`` made a server unreachable until the header timeout closed
them (10 s by default; 70 s before there was one). So a server holds at most :func:`connection_cap` connections,
below that limit. When one more arrives at the cap, the connection open
longest without a request in progress (half-sent headers, an idle keep-alive) is closed to make room, so a flood of
connections that never send a request cannot lock out a client that does; a request in progress is never cut, and
when every connection has one, the newcomer is closed at once. Each is counted and logged in one line at most once
per ``every_s``, not a traceback each.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import resource
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

logger = logging.getLogger(__name__)

ACCEPT_BACKLOG = 64  # connections the kernel queues, and the event loop accepts in one go before any is made
FD_HEADROOM = 32  # descriptors a model may open after the server starts (files, pipes to workers)


def connection_cap(wanted: int, backlog: int = ACCEPT_BACKLOG) -> int:
    """``wanted``, lowered so that a full server still has :data:`FD_HEADROOM` more descriptors than it has open now
    (the model is loaded by then) and two accept bursts of ``backlog``. Two, because the event loop makes a connection
    (calls the protocol factory) one tick after it accepted the socket, and frees the descriptor of a connection
    closed to make room one tick after the close: at the cap, one burst accepted but not yet made can meet the
    previous burst's closings not yet freed."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return wanted
    open_now = len(os.listdir("/dev/fd"))
    kept = 2 * backlog + FD_HEADROOM
    room = soft - open_now - kept
    if room < 1:
        raise ValueError(f"the open-file limit ({soft}, ulimit -n) leaves no descriptor for connections: the server "
                         f"has {open_now} open and keeps {kept} for accepting and its model; raise it "
                         f"to at least {open_now + kept + 64}")
    if room < wanted:
        logger.info("at most %d connections at once (max_connections %d): the open-file limit is %d", room, wanted,
                    soft)
    return min(wanted, room)


class _EveryFewSeconds:
    """One log line per ``every_s`` at most, saying how many events it stands for."""

    def __init__(self, every_s: float, level: int) -> None:
        self.every_s, self.level, self.last, self.missed = every_s, level, -math.inf, 0

    def log(self, now: float, message: str, *args: Any) -> None:
        if now - self.last < self.every_s:
            self.missed += 1
            return
        logger.log(self.level, f"{message} (%d more such in the last %g s)", *args, self.missed, self.every_s)
        self.last, self.missed = now, 0


class AcceptErrorLog:
    """The event loop's exception handler: an accept error (out of file descriptors, a flood of connections) is
    logged in one line, at most once per ``every_s``, with the count since; the loop retries the accept by itself.
    Anything else goes to the default handler."""

    def __init__(self, every_s: float = 10.0) -> None:
        self.lines = _EveryFewSeconds(every_s, logging.ERROR)

    def __call__(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        if "accept" not in context.get("message", ""):
            loop.default_exception_handler(context)
            return
        self.lines.log(loop.time(), "cannot accept connections: %s", context.get("exception") or context["message"])


class _CloseAtOnce(asyncio.Protocol):
    """A connection the server has no room for."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.close()


class ConnectionCap:
    """At most ``limit`` connections to an aiohttp server: :meth:`track_requests` goes in the application's
    middlewares (it knows which connections have a request in progress), :meth:`protocol_factory` is what the
    listening socket creates connections with."""

    def __init__(self, limit: int, every_s: float = 10.0) -> None:
        self.limit = limit
        self.made_room = 0  # idle connections closed for a newcomer
        self.turned_away = 0  # newcomers closed because every connection had a request in progress
        self._busy: set[web.RequestHandler] = set()
        self._opening = 0  # connections given a handler whose connection_made has not run yet
        self._lines = _EveryFewSeconds(every_s, logging.WARNING)

    @web.middleware
    async def track_requests(self, request: web.Request,
                             handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
        self._busy.add(request.protocol)
        try:
            return await handler(request)
        finally:
            self._busy.discard(request.protocol)

    def protocol_factory(self, server: web.Server) -> Callable[[], asyncio.BaseProtocol]:
        loop = asyncio.get_running_loop()

        def opened() -> None:
            self._opening -= 1

        def connect() -> asyncio.BaseProtocol:
            # the loop runs connection_made (which lists the connection in server.connections) in a later callback:
            # those given a handler meanwhile are counted apart, so a burst of connections cannot overshoot the cap
            live = [handler for handler in server.connections if handler.transport is not None]
            if len(live) + self._opening >= self.limit:
                idle = next((handler for handler in live if handler not in self._busy), None)
                if idle is None:
                    self.turned_away += 1
                    self._log(loop)
                    return _CloseAtOnce()
                idle.force_close()
                self.made_room += 1
                self._log(loop)
            self._opening += 1
            loop.call_soon(opened)
            return server()

        return connect

    def _log(self, loop: asyncio.AbstractEventLoop) -> None:
        self._lines.log(loop.time(), "at the cap of %d connections: closing the idle one open longest for each "
                                     "new one (%d so far), or the new one when none is idle (%d so far)",
                        self.limit, self.made_room, self.turned_away)
