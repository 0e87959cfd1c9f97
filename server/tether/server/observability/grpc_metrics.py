"""The gRPC server series as a layer of the generic handler (handlers.py;
only when metrics are served): started, handled by final code, handling
time, and messages each way. Each method's labelled children are made once."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import grpc

from tether.server.observability import fast, metrics
from tether.server.observability.handlers import (
    CallObserver,
    MethodObserver,
    rpc_type,
    split_method,
)


class _Method:
    __slots__ = ("_handled", "_labels", "received", "seconds", "sent", "started")

    def __init__(self, method: str, handler: grpc.RpcMethodHandler[Any, Any]) -> None:
        service, name = split_method(method)
        self._labels = (rpc_type(handler), service, name)
        self.started = fast.increment(metrics.GRPC_STARTED.labels(*self._labels))
        self.received = fast.increment(metrics.GRPC_MSG_RECEIVED.labels(*self._labels))
        self.sent = fast.increment(metrics.GRPC_MSG_SENT.labels(*self._labels))
        self.seconds = fast.Observe(metrics.GRPC_HANDLING_SECONDS.labels(*self._labels))
        self._handled: dict[grpc.StatusCode, Callable[[float], None]] = {}

    def handled(self, code: grpc.StatusCode) -> Callable[[float], None]:
        increment = self._handled.get(code)
        if increment is None:
            increment = fast.increment(metrics.GRPC_HANDLED.labels(*self._labels, code.name))
            self._handled[code] = increment
        return increment

    def start(self, context: grpc.aio.ServicerContext[Any, Any]) -> CallObserver:
        self.started(1)
        return _Call(self)


class _Call:
    __slots__ = ("_method", "_started")

    def __init__(self, method: _Method) -> None:
        self._method = method
        self._started = time.perf_counter()

    def received(self) -> None:
        self._method.received(1)

    def sent(self) -> None:
        self._method.sent(1)

    def done(self, code: grpc.StatusCode) -> None:
        method = self._method
        method.seconds(time.perf_counter() - self._started)
        method.handled(code)(1)


class MetricsLayer:
    def observer(self, method: str, handler: grpc.RpcMethodHandler[Any, Any]) -> MethodObserver:
        return _Method(method, handler)
