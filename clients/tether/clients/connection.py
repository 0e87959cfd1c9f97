"""Opening a channel to Tether with a bearer credential."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

import grpc

from tether.clients.failures import CommandError, read_text

DEFAULT_ADDRESS = "127.0.0.1:50051"


class _Bearer:
    """Adds "authorization: Bearer <token>" to every call."""

    def __init__(self, token: str) -> None:
        self._header = ("authorization", f"Bearer {token}")

    def _details(self, details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
        metadata = grpc.aio.Metadata(*(details.metadata or ()))
        metadata.add(*self._header)
        return grpc.aio.ClientCallDetails(
            details.method, details.timeout, metadata, details.credentials, details.wait_for_ready
        )


# grpc.aio files each interceptor under the first call type it implements
# only, so each call type needs an interceptor object of its own.
class _BearerUnaryUnary(_Bearer, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(
        self, continuation: Callable[..., Any], details: grpc.aio.ClientCallDetails, request: Any
    ) -> Any:
        return await continuation(self._details(details), request)


class _BearerUnaryStream(_Bearer, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(
        self, continuation: Callable[..., Any], details: grpc.aio.ClientCallDetails, request: Any
    ) -> Any:
        return await continuation(self._details(details), request)


class _BearerStreamUnary(_Bearer, grpc.aio.StreamUnaryClientInterceptor):
    async def intercept_stream_unary(
        self, continuation: Callable[..., Any], details: grpc.aio.ClientCallDetails, requests: Any
    ) -> Any:
        return await continuation(self._details(details), requests)


class _BearerStreamStream(_Bearer, grpc.aio.StreamStreamClientInterceptor):
    async def intercept_stream_stream(
        self, continuation: Callable[..., Any], details: grpc.aio.ClientCallDetails, requests: Any
    ) -> Any:
        return await continuation(self._details(details), requests)


def open_channel(
    address: str,
    token: str,
    *,
    tls: bool = False,
    options: Sequence[tuple[str, Any]] = (),
) -> grpc.aio.Channel:
    """An async channel whose every call carries the token."""
    interceptors: list[grpc.aio.ClientInterceptor] = [
        _BearerUnaryUnary(token),
        _BearerUnaryStream(token),
        _BearerStreamUnary(token),
        _BearerStreamStream(token),
    ]
    if tls:
        return grpc.aio.secure_channel(
            address, grpc.ssl_channel_credentials(), options=options, interceptors=interceptors
        )
    return grpc.aio.insecure_channel(address, options=options, interceptors=interceptors)


def resolve_token(token: str | None, token_file: str | None) -> str:
    """--token, else --token-file, else $TETHER_TOKEN, else $TETHER_TOKEN_FILE."""
    if token:
        return token
    path = token_file or os.environ.get("TETHER_TOKEN_FILE")
    if not path and os.environ.get("TETHER_TOKEN"):
        return os.environ["TETHER_TOKEN"]
    if not path:
        raise CommandError("no credential: pass --token or --token-file, or set TETHER_TOKEN")
    flag = "--token-file" if token_file else "TETHER_TOKEN_FILE"
    fix = "give the file that holds your token (tether-admin create-credential --token-only)"
    read = read_text(flag, path, fix).strip()
    if not read:
        raise CommandError(f"{flag} {path}: the file is empty; {fix}")
    return read
