"""The trace context a call leaves in what it writes, and the spans that
pick it up later (an instruction's delivery links to its report).

Both are None when tracing is off: callers then store "" and make no span,
and no OpenTelemetry code is loaded.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager
from types import TracebackType
from typing import Any

from tether.server.observability.setup import current


def traceparent_source() -> Callable[[], str] | None:
    """A function giving the current call's W3C traceparent ("" when it is
    not sampled), or None when tracing is off."""
    if current().tracer is None:
        return None
    from tether.server.observability.tracing import current_traceparent

    return current_traceparent


class LinkedSpans:
    """Spans of a step that continues earlier work: each links to the spans
    stored traceparents name, and nests under the current span."""

    def __init__(self, tracer: Any, name: str) -> None:
        from opentelemetry.trace import SpanKind, use_span

        from tether.server.observability.tracing import link_to

        self._tracer = tracer
        self._name = name
        self._kind = SpanKind.INTERNAL
        self._link_to = link_to
        self._use_span = use_span

    def _span(self, traceparents: Iterable[str], attributes: dict[str, Any]) -> Any:
        links = [link for parent in traceparents for link in self._link_to(parent)]
        return self._tracer.start_span(
            self._name, kind=self._kind, links=links, attributes=attributes
        )

    def start(self, traceparents: Iterable[str], attributes: dict[str, Any]) -> _Ended:
        """A span the caller ends (across an await or a yield); not current."""
        return _Ended(self._span(traceparents, attributes))

    def current(
        self, traceparents: Iterable[str], attributes: dict[str, Any]
    ) -> AbstractContextManager[Any]:
        """A span current inside the with block (the SQL under it nests), ended after it."""
        return self._use_span(self._span(traceparents, attributes), end_on_exit=True)


class _Ended:
    __slots__ = ("_span",)

    def __init__(self, span: Any) -> None:
        self._span = span

    def __enter__(self) -> None:
        return None

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._span.end()

    def end(self) -> None:
        self._span.end()


def linked_spans(name: str) -> LinkedSpans | None:
    tracer = current().tracer
    return None if tracer is None else LinkedSpans(tracer, name)
