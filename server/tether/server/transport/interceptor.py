"""The one interception point: authenticates every call, then maps what the
handler raises to a status; metrics and tracing, when on, wrap it
(observability/handlers.py).

Wrapping the handler (rather than each servicer method) keeps the mapping in
one place and lets servicers raise domain errors freely. It is a generic
handler in front of the services' own, not a grpc.aio ServerInterceptor: with
any interceptor installed, grpc.aio runs its interceptor chain (coroutines
and a handler look-up through a closure) for every call it accepts, which
cost as much as a guard Evaluate's own checks.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from typing import Any, Protocol

import grpc
from redis.exceptions import ConnectionError as RedisConnectionError
from sqlalchemy.exc import DBAPIError, OperationalError

from tether.common.v1.errors_pb2 import ErrorReason
from tether.server import errors, logs
from tether.server.observability.handlers import ObservingLayer, observed
from tether.server.storage.database import CONNECTION_OUTAGES
from tether.server.transport import principal as principals
from tether.server.transport import request_check, tls
from tether.server.transport.status import abort, code_of

log = logs.get(__name__)

# Standard services that load balancers and stock tools call without a token.
PUBLIC_PREFIXES = ("/grpc.health.v1.", "/grpc.reflection.")


class Authenticator(Protocol):
    async def authenticate(self, token: str) -> principals.Principal | None: ...


def _bearer(metadata: Iterable[tuple[str, str | bytes]] | None) -> str:
    for key, value in metadata or ():
        if key == "authorization" and isinstance(value, str):
            scheme, _, token = value.partition(" ")
            if scheme.lower() == "bearer":
                return token.strip()
    return ""


class AuthenticatingHandler(grpc.GenericRpcHandler):
    """Every service's methods, authenticated: the server's only generic handler."""

    def __init__(self, authenticator: Authenticator, layers: Sequence[ObservingLayer] = ()) -> None:
        self._auth = authenticator
        # Metrics and tracing, outermost first: they see every call of a
        # known method, refused ones included.
        self._layers = tuple(layers)
        self._services: list[grpc.GenericRpcHandler] = []
        # Per method: the wrapped handler, built once rather than on every call.
        self._wrapped: dict[str, grpc.RpcMethodHandler[Any, Any]] = {}

    def add(self, services: Sequence[grpc.GenericRpcHandler]) -> None:
        self._services.extend(services)
        self._wrapped.clear()

    def service(
        self, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        method: str = handler_call_details.method
        wrapped = self._wrapped.get(method)
        if wrapped is not None:
            return wrapped
        for service in self._services:
            handler = service.service(handler_call_details)
            if handler is not None:
                break
        else:
            return None  # not cached: unknown names must not grow the cache
        if not method.startswith(PUBLIC_PREFIXES):
            handler = _wrap(handler, method, self._auth)
        handler = observed(handler, method, self._layers)
        self._wrapped[method] = handler
        return handler


async def _enter(context: grpc.aio.ServicerContext[Any, Any], auth: Authenticator) -> None:
    token = _bearer(context.invocation_metadata())
    principal = await auth.authenticate(token) if token else None
    if principal is None:
        raise errors.Unauthenticated(
            ErrorReason.ERROR_REASON_CREDENTIAL_INVALID,
            "send a valid credential as 'authorization: Bearer <token>'",
        )
    if principal.client_subject is not None and not tls.subject_matches(
        principal.client_subject, context.auth_context()
    ):
        raise errors.Unauthenticated(
            ErrorReason.ERROR_REASON_CLIENT_CERTIFICATE_MISMATCH,
            "this credential is bound to a client certificate: call over mutual TLS "
            "with the certificate it names",
        )
    principals.set_current(principal)


def _is_backend_outage(exc: BaseException) -> bool:
    """The database or Redis went away: the caller should retry, not file a bug."""
    if isinstance(exc, DBAPIError):
        return (
            exc.connection_invalidated
            or isinstance(exc, OperationalError)
            or isinstance(exc.orig, CONNECTION_OUTAGES)
            or isinstance(getattr(exc.orig, "__cause__", None), CONNECTION_OUTAGES)
        )
    return isinstance(
        exc, (ConnectionError, TimeoutError, RedisConnectionError, *CONNECTION_OUTAGES)
    )


def _elapsed_ms(started: float) -> float:
    return round((time.perf_counter() - started) * 1000, 2)


async def _fail(
    context: grpc.aio.ServicerContext[Any, Any], method: str, exc: BaseException, started: float
) -> None:
    elapsed_ms = _elapsed_ms(started)
    if _is_backend_outage(exc):
        exc = errors.Unavailable(
            ErrorReason.ERROR_REASON_BACKEND_UNAVAILABLE,
            "a backing store did not answer; retry",
        )
    if isinstance(exc, errors.TetherError):
        # A caller's mistake: worth a line, not an alarm.
        log.info(
            "rpc refused",
            method=method,
            code=code_of(exc).name,
            reason=ErrorReason.Name(exc.reason),
            ms=elapsed_ms,
        )
        await abort(context, exc)
    log.exception("rpc failed", method=method, ms=elapsed_ms)
    await context.abort(grpc.StatusCode.INTERNAL, "internal error; it has been logged")


async def _checked(requests: AsyncIterator[Any]) -> AsyncIterator[Any]:
    """A client stream's messages; one refused as it was parsed ends the call."""
    async for request in requests:
        request_check.raise_if_refused(request)
        yield request


def _wrap(
    handler: grpc.RpcMethodHandler[Any, Any], method: str, auth: Authenticator
) -> grpc.RpcMethodHandler[Any, Any]:
    h: Any = handler
    client_streaming = bool(h.stream_unary or h.stream_stream)
    behaviour = h.unary_unary or h.stream_unary or h.unary_stream or h.stream_stream
    whole = not getattr(behaviour, "checks_own_messages", False)
    # Asked once, at the method's first call (logging is configured by
    # then), rather than building the line's arguments on every call.
    debug = log.is_enabled_for(logging.DEBUG)

    def checked(request: Any) -> Any:
        """A unary request, or each message of a client stream, as it was
        checked when it was parsed: a refused one is raised."""
        if client_streaming:
            return _checked(request)
        request_check.raise_if_refused(request)
        return request

    def unary_result(behavior: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
        async def run(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            started = time.perf_counter()
            try:
                await _enter(context, auth)
                result = await behavior(checked(request), context)
            except Exception as exc:
                if _is_abort(exc):
                    raise
                await _fail(context, method, exc, started)
            else:
                if debug:
                    log.debug("rpc", method=method, ms=_elapsed_ms(started))
                return result

        return run

    def stream_result(behavior: Callable[..., AsyncIterator[Any]]) -> Callable[..., Any]:
        async def run(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            started = time.perf_counter()
            try:
                await _enter(context, auth)
                async for item in behavior(checked(request), context):
                    yield item
            except Exception as exc:
                if _is_abort(exc):
                    raise
                await _fail(context, method, exc, started)
            else:
                if debug:
                    log.debug("rpc", method=method, ms=_elapsed_ms(started))

        return run

    # The request checks run as a body is parsed, where its bytes are at
    # hand; a body that does not parse or fails them reaches the handler as
    # Refused, so the caller is authenticated first and then told
    # INVALID_ARGUMENT (gRPC's own answer would be UNKNOWN, before
    # authentication). A method that checks its own messages gets only the
    # parse refused.
    parse = request_check.lenient(h.request_deserializer, checked=whole)
    if h.unary_unary:
        return grpc.unary_unary_rpc_method_handler(
            unary_result(h.unary_unary), parse, h.response_serializer
        )
    if h.stream_unary:
        return grpc.stream_unary_rpc_method_handler(
            unary_result(h.stream_unary), parse, h.response_serializer
        )
    if h.unary_stream:
        return grpc.unary_stream_rpc_method_handler(
            stream_result(h.unary_stream), parse, h.response_serializer
        )
    return grpc.stream_stream_rpc_method_handler(
        stream_result(h.stream_stream), parse, h.response_serializer
    )


def _is_abort(exc: BaseException) -> bool:
    # context.abort() raises this to unwind the handler; it must pass through.
    return type(exc).__name__ == "AbortError" or isinstance(exc, grpc.aio.AbortError)
