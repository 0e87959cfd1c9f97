"""What metrics and tracing share: a method handler wrapped so that an
observer sees each call's start, its messages and its final status.

The server's one generic handler (transport/interceptor.py) wraps each
method's handler in these layers once, around its own authentication and
error mapping, so the status is read from the context once the handler is
done: an abort there (UNAUTHENTICATED, INVALID_ARGUMENT, ...) has set it by
then. They are layers of that handler, not grpc.aio ServerInterceptors:
with any interceptor installed, grpc.aio runs its interceptor chain for
every call it accepts, which cost serving metrics about a tenth of a
returning browser's Evaluate.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, Protocol

import grpc

# grpc.aio keeps a call's status as the C core's number.
_CODES = {code.value[0]: code for code in grpc.StatusCode}


class CallObserver(Protocol):
    """One call, seen by one interceptor."""

    def received(self) -> None: ...

    def sent(self) -> None: ...

    def done(self, code: grpc.StatusCode) -> None: ...


class MethodObserver(Protocol):
    """One method: makes an observer per call."""

    def start(self, context: grpc.aio.ServicerContext[Any, Any]) -> CallObserver: ...


def rpc_type(handler: grpc.RpcMethodHandler[Any, Any]) -> str:
    """grpc_type as go-grpc-prometheus names it."""
    if handler.request_streaming:
        return "bidi_stream" if handler.response_streaming else "client_stream"
    return "server_stream" if handler.response_streaming else "unary"


def split_method(method: str) -> tuple[str, str]:
    """'/pkg.Service/Method' -> ('pkg.Service', 'Method')."""
    service, _, name = method[1:].rpartition("/")
    return service, name


def final_code(
    context: grpc.aio.ServicerContext[Any, Any], raised: BaseException | None
) -> grpc.StatusCode:
    """The status the caller gets: what the context was aborted or set with,
    else OK for a handler that returned, CANCELLED (or DEADLINE_EXCEEDED)
    for one cancelled or closed, and UNKNOWN for one that raised (grpc's
    own answer)."""
    set_code: Any = context.code()
    if isinstance(set_code, grpc.StatusCode):
        code = set_code
    else:
        code = _CODES.get(set_code, grpc.StatusCode.OK)
    if code is not grpc.StatusCode.OK or raised is None:
        return code
    # GeneratorExit: grpc closed a response stream the caller abandoned.
    if isinstance(raised, asyncio.CancelledError | GeneratorExit):
        remaining = context.time_remaining()
        if remaining is not None and remaining <= 0:
            return grpc.StatusCode.DEADLINE_EXCEEDED
        return grpc.StatusCode.CANCELLED
    return grpc.StatusCode.UNKNOWN


def wrap(
    handler: grpc.RpcMethodHandler[Any, Any], observer: MethodObserver
) -> grpc.RpcMethodHandler[Any, Any]:
    """handler, with observer told of every call it serves."""
    h: Any = handler

    def unary_response(
        behavior: Callable[..., Awaitable[Any]], streamed_requests: bool
    ) -> Callable[..., Awaitable[Any]]:
        async def run(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            call = observer.start(context)
            if streamed_requests:
                request = _counted(request, call)
            else:
                call.received()
            try:
                response = await behavior(request, context)
            except BaseException as exc:
                call.done(final_code(context, exc))
                raise
            call.sent()
            call.done(final_code(context, None))
            return response

        return run

    def streamed_response(
        behavior: Callable[..., AsyncIterator[Any]], streamed_requests: bool
    ) -> Callable[..., AsyncIterator[Any]]:
        async def run(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            call = observer.start(context)
            if streamed_requests:
                request = _counted(request, call)
            else:
                call.received()
            try:
                async for item in behavior(request, context):
                    call.sent()
                    yield item
            except BaseException as exc:
                call.done(final_code(context, exc))
                raise
            call.done(final_code(context, None))

        return run

    parse, serialize = h.request_deserializer, h.response_serializer
    if h.unary_unary:
        return grpc.unary_unary_rpc_method_handler(
            unary_response(h.unary_unary, False), parse, serialize
        )
    if h.stream_unary:
        return grpc.stream_unary_rpc_method_handler(
            unary_response(h.stream_unary, True), parse, serialize
        )
    if h.unary_stream:
        return grpc.unary_stream_rpc_method_handler(
            streamed_response(h.unary_stream, False), parse, serialize
        )
    return grpc.stream_stream_rpc_method_handler(
        streamed_response(h.stream_stream, True), parse, serialize
    )


async def _counted(requests: AsyncIterator[Any], call: CallObserver) -> AsyncIterator[Any]:
    async for request in requests:
        call.received()
        yield request


class ObservingLayer(Protocol):
    """Metrics or tracing: makes an observer once per method, which the
    generic handler wraps around the method's handler (wrap)."""

    def observer(self, method: str, handler: grpc.RpcMethodHandler[Any, Any]) -> MethodObserver: ...


def observed(
    handler: grpc.RpcMethodHandler[Any, Any], method: str, layers: Sequence[ObservingLayer]
) -> grpc.RpcMethodHandler[Any, Any]:
    """handler wrapped in each layer, the first outermost."""
    for layer in reversed(layers):
        handler = wrap(handler, layer.observer(method, handler))
    return handler
