"""Backend calls timed and traced: Redis at its call sites; PostgreSQL
per connection use (metrics) and per statement through asyncpg's query
loggers (spans).

A call site asks for its probe once (when its object is built) and gets
None when neither metrics nor tracing is on; then it calls as before, at
no cost:

    probe = probes.redis("guard.evaluate")       # once
    if probe is None:
        return await call()
    with probe.timing():
        return await call()
"""

from __future__ import annotations

import time
from types import TracebackType
from typing import Any

from tether.server.observability import fast, metrics
from tether.server.observability.setup import current

_STATEMENT_CHARS = 2000


class Probe:
    """One kind of Redis call: a latency series and a client span name."""

    __slots__ = ("_attributes", "_client", "_name", "_seconds", "_tracer")

    def __init__(self, operation: str, observe: bool, tracer: Any) -> None:
        self._seconds = fast.Observe(metrics.REDIS_SECONDS.labels(operation)) if observe else None
        self._tracer = tracer
        self._client: Any = None
        if tracer is not None:
            from opentelemetry.trace import SpanKind

            self._client = SpanKind.CLIENT
        self._name = f"redis {operation}"
        self._attributes = {"db.system": "redis", "db.operation": operation}

    def timing(self) -> _Timing:
        span = None
        if self._tracer is not None:
            span = self._tracer.start_span(
                self._name, kind=self._client, attributes=self._attributes
            )
        return _Timing(self._seconds, span)


class _Timing:
    __slots__ = ("_seconds", "_span", "_started")

    def __init__(self, seconds: Any, span: Any) -> None:
        self._seconds = seconds
        self._span = span
        self._started = time.perf_counter()

    def __enter__(self) -> None:
        return None

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self._seconds is not None:
            self._seconds(time.perf_counter() - self._started)
        span = self._span
        if span is not None:
            if exc is not None:
                from opentelemetry.trace import Status, StatusCode

                span.set_status(Status(StatusCode.ERROR, type(exc).__name__))
            span.end()


def redis(operation: str) -> Probe | None:
    observability = current()
    if not observability.metrics and observability.tracer is None:
        return None
    return Probe(operation, observability.metrics, observability.tracer)


def connection_observer() -> Any:
    """For storage.database's observe_connections: the PostgreSQL
    histogram's observe, or None when metrics are off."""
    return fast.Observe(metrics.POSTGRES_SECONDS) if current().metrics else None


def query_logger() -> Any:
    """A callback for asyncpg's add_query_logger (storage.database's
    observe_queries) making a span per statement, or None when tracing is
    off. asyncpg calls it soon after each statement, in the context of the
    call that ran it, so the span lands under that call's span."""
    tracer = current().tracer
    if tracer is None:
        return None
    from opentelemetry.trace import SpanKind, Status, StatusCode

    def on_query(record: Any) -> None:
        ended = time.time_ns()
        query: str = record.query
        words = query.split(None, 1)
        span = tracer.start_span(
            f"postgresql {words[0].upper() if words else ''}",
            kind=SpanKind.CLIENT,
            start_time=ended - int(record.elapsed * 1e9),
            attributes={"db.system": "postgresql", "db.statement": query[:_STATEMENT_CHARS]},
        )
        if record.exception is not None:
            span.set_status(Status(StatusCode.ERROR, type(record.exception).__name__))
        span.end(end_time=ended)

    return on_query
