"""The gRPC server series as a grpc.aio interceptor (installed only when
metrics are served): started, handled by final code, handling time, and
messages each way. Each method's labelled children are made once."""

from __future__ import annotations

import time
from typing import Any

import grpc

from tether.server.observability import metrics
from tether.server.observability.handlers import (
    CallObserver,
    MethodObserver,
    ObservingInterceptor,
    rpc_type,
    split_method,
)


class _Method:
    __slots__ = ("_handled", "_labels", "received", "seconds", "sent", "started")

    def __init__(self, method: str, handler: grpc.RpcMethodHandler[Any, Any]) -> None:
        service, name = split_method(method)
        self._labels = (rpc_type(handler), service, name)
        self.started = metrics.GRPC_STARTED.labels(*self._labels)
        self.received = metrics.GRPC_MSG_RECEIVED.labels(*self._labels)
        self.sent = metrics.GRPC_MSG_SENT.labels(*self._labels)
        self.seconds = metrics.GRPC_HANDLING_SECONDS.labels(*self._labels)
        self._handled: dict[grpc.StatusCode, Any] = {}

    def handled(self, code: grpc.StatusCode) -> Any:
        child = self._handled.get(code)
        if child is None:
            child = metrics.GRPC_HANDLED.labels(*self._labels, code.name)
            self._handled[code] = child
        return child

    def start(self, context: grpc.aio.ServicerContext[Any, Any]) -> CallObserver:
        self.started.inc()
        return _Call(self)


class _Call:
    __slots__ = ("_method", "_started")

    def __init__(self, method: _Method) -> None:
        self._method = method
        self._started = time.perf_counter()

    def received(self) -> None:
        self._method.received.inc()

    def sent(self) -> None:
        self._method.sent.inc()

    def done(self, code: grpc.StatusCode) -> None:
        method = self._method
        method.seconds.observe(time.perf_counter() - self._started)
        method.handled(code).inc()


class MetricsInterceptor(ObservingInterceptor):
    def observer(self, method: str, handler: grpc.RpcMethodHandler[Any, Any]) -> MethodObserver:
        return _Method(method, handler)
