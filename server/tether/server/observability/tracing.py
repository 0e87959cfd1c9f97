"""OpenTelemetry tracing: the provider, the per-RPC server span, and the
trace context an instruction carries from its report to its delivery.

Imported only when tracing is on (setup.py), so a server without it loads
no OpenTelemetry code at all. The exporter (OTLP over gRPC), the sampler
and the resource follow the standard OTEL_* variables.
"""

from __future__ import annotations

from typing import Any

import grpc
from opentelemetry import context as context_api
from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.trace import Link, SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from tether.server.observability.handlers import (
    CallObserver,
    MethodObserver,
    split_method,
)

TRACER_NAME = "tether.server"
_PROPAGATOR = TraceContextTextMapPropagator()
_CARRIED = frozenset(("traceparent", "tracestate"))

# Codes that are the server's fault (OpenTelemetry's gRPC conventions);
# the others are the caller's and leave the span's status unset.
_SERVER_FAULTS = frozenset(
    (
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.UNIMPLEMENTED,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DATA_LOSS,
    )
)


def exporting_provider() -> TracerProvider:
    """A provider that batches spans to the OTLP endpoint of the OTEL_* variables."""
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

    provider = TracerProvider(resource=Resource.create({"service.name": "tether"}))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    return provider


class _TracedMethod:
    __slots__ = ("_attributes", "_name", "_tracer")

    def __init__(self, tracer: trace.Tracer, method: str) -> None:
        service, name = split_method(method)
        self._tracer = tracer
        self._name = method[1:]
        self._attributes = {"rpc.system": "grpc", "rpc.service": service, "rpc.method": name}

    def start(self, context: grpc.aio.ServicerContext[Any, Any]) -> CallObserver:
        carrier = {
            key: value
            for key, value in context.invocation_metadata() or ()
            if key in _CARRIED and isinstance(value, str)
        }
        parent = _PROPAGATOR.extract(carrier) if carrier else None
        span = self._tracer.start_span(
            self._name, context=parent, kind=SpanKind.SERVER, attributes=self._attributes
        )
        # Current for the rest of the call: SQL and Redis spans nest under it.
        token = context_api.attach(trace.set_span_in_context(span))
        return _TracedCall(span, token)


class _TracedCall:
    __slots__ = ("_span", "_token")

    def __init__(self, span: trace.Span, token: object) -> None:
        self._span = span
        self._token = token

    def received(self) -> None:
        pass

    def sent(self) -> None:
        pass

    def done(self, code: grpc.StatusCode) -> None:
        span = self._span
        span.set_attribute("rpc.grpc.status_code", code.value[0])
        if code in _SERVER_FAULTS:
            span.set_status(Status(StatusCode.ERROR, code.name))
        span.end()
        context_api.detach(self._token)  # type: ignore[arg-type]


class TracingLayer:
    """One server span per RPC, continuing the caller's W3C traceparent."""

    def __init__(self, tracer: trace.Tracer) -> None:
        self._tracer = tracer

    def observer(self, method: str, handler: grpc.RpcMethodHandler[Any, Any]) -> MethodObserver:
        return _TracedMethod(self._tracer, method)


def current_traceparent() -> str:
    """The W3C traceparent of the current span; "" outside a sampled one."""
    span_context = trace.get_current_span().get_span_context()
    if not span_context.is_valid or not span_context.trace_flags.sampled:
        return ""
    return (
        f"00-{span_context.trace_id:032x}-{span_context.span_id:016x}-"
        f"{int(span_context.trace_flags):02x}"
    )


def link_to(traceparent: str) -> list[Link]:
    """A link to the span a stored traceparent names; none if it names none."""
    if not traceparent:
        return []
    span_context = trace.get_current_span(
        _PROPAGATOR.extract({"traceparent": traceparent})
    ).get_span_context()
    return [Link(span_context)] if span_context.is_valid else []
