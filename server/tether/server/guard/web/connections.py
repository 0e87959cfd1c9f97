"""Bounds on the web side's connections.

The web side shares the process with the gRPC API. A client that opens
sockets and holds them (sending nothing, stalling in its headers or its
body, or idling between requests) would otherwise keep them for as long as
it likes, until the process runs out of file descriptors and accepts
nothing, gRPC included. So:

- at most `limit` connections at once (TETHER_GUARD_WEB_MAX_CONNECTIONS,
  and never more than a quarter of the file descriptors the process may
  open), and PER_CLIENT from one address (a trusted proxy's own address is
  bounded by `limit` alone); a connection beyond either is closed as it
  opens;
- a connection that sends nothing for `idle` seconds
  (TETHER_GUARD_WEB_IDLE_SECONDS) is closed, whatever it was doing: idle
  between requests, or stalled in one (a browser opens another when it
  needs one).
"""

from __future__ import annotations

import asyncio
import logging
import resource
from collections import Counter
from collections.abc import Callable, Iterable

from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestPayloadError

from tether.server.guard.web.addresses import Network, within
from tether.server.observability import metrics

_REFUSED_TOTAL = metrics.GUARD_WEB_CONNECTIONS_REFUSED.labels("total")
_REFUSED_PER_CLIENT = metrics.GUARD_WEB_CONNECTIONS_REFUSED.labels("per_client")

# Browsers open six or so per host; a household or an office behind one
# address, a few dozen.
PER_CLIENT = 64


def connection_limit(wanted: int) -> int:
    """`wanted`, but at most a quarter of the file descriptors the process
    may open: the rest stay for gRPC, SQL and Redis."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return wanted
    return max(16, min(wanted, soft // 4))


class Bounds:
    """Counts the open connections; wraps the server's protocol factory."""

    def __init__(
        self,
        factory: Callable[[], asyncio.Protocol],
        trusted: Iterable[Network],
        *,
        limit: int,
        idle: float,
        per_client: int = PER_CLIENT,
    ) -> None:
        self._factory = factory
        self._trusted = list(trusted)
        self.limit = limit
        self.per_client = per_client
        self.idle = idle
        self.open = 0
        self._by_client: Counter[str] = Counter()

    def __call__(self) -> asyncio.Protocol:
        return _Bounded(self)

    def protocol(self) -> asyncio.Protocol:
        """The wrapped protocol, for an admitted connection."""
        return self._factory()

    def admit(self, client: str) -> bool:
        if self.open >= self.limit:
            _REFUSED_TOTAL.inc()
            return False
        if self._by_client[client] >= self.per_client and not within(client, self._trusted):
            _REFUSED_PER_CLIENT.inc()
            return False
        self.open += 1
        self._by_client[client] += 1
        return True

    def release(self, client: str) -> None:
        self.open -= 1
        self._by_client[client] -= 1
        if not self._by_client[client]:
            del self._by_client[client]


class _Bounded(asyncio.Protocol):
    """One connection: admitted or closed as it opens, then closed once
    silent for the bounds' `idle` seconds. Everything else is the wrapped
    protocol's (aiohttp's request handler), made only once admitted."""

    def __init__(self, bounds: Bounds) -> None:
        self._bounds = bounds
        self._inner: asyncio.Protocol | None = None
        self._client = ""
        self._transport: asyncio.Transport | None = None
        self._heard = 0.0
        self._timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        peer = transport.get_extra_info("peername")
        self._client = str(peer[0]) if peer else ""
        if not self._bounds.admit(self._client):
            transport.abort()
            return
        self._transport = transport
        loop = asyncio.get_running_loop()
        self._heard = loop.time()
        self._timer = loop.call_at(self._heard + self._bounds.idle, self._check_silence)
        self._inner = self._bounds.protocol()
        self._inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        if self._inner is not None:
            # Read by the timer when it fires: cheaper than moving it each time.
            self._heard = asyncio.get_running_loop().time()
            self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self._inner.eof_received() if self._inner is not None else None

    def pause_writing(self) -> None:
        if self._inner is not None:
            self._inner.pause_writing()

    def resume_writing(self) -> None:
        if self._inner is not None:
            self._inner.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._inner is None:
            return
        if self._timer is not None:
            self._timer.cancel()
        self._bounds.release(self._client)
        inner, self._inner = self._inner, None
        inner.connection_lost(exc)

    def _check_silence(self) -> None:
        self._timer = None
        if self._inner is None or self._transport is None:
            return
        loop = asyncio.get_running_loop()
        due = self._heard + self._bounds.idle
        if loop.time() < due:
            self._timer = loop.call_at(due, self._check_silence)
            return
        # Aborted, not closed: a client that does not read would hold a
        # close waiting for its buffer to drain.
        metrics.GUARD_WEB_CONNECTIONS_SILENT.inc()
        self._transport.abort()


class ClientMistakes(logging.Filter):
    """Keeps a client's malformed HTTP (a bad request line, an over-long
    header, an undecodable body) and its hanging up mid-request out of the
    log, where aiohttp writes each with a traceback: anyone could fill the
    log with them. aiohttp answers them 400 (or nobody, for a hang-up);
    tether_guard_web_bad_requests_total counts them."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if isinstance(error, HttpProcessingError | RequestPayloadError | ConnectionError):
            metrics.GUARD_WEB_BAD_REQUESTS.inc()
            return False
        return True


def quiet_client_mistakes() -> None:
    """Installs ClientMistakes on aiohttp's server logger (once)."""
    logger = logging.getLogger("aiohttp.server")
    if not any(isinstance(f, ClientMistakes) for f in logger.filters):
        logger.addFilter(ClientMistakes())
