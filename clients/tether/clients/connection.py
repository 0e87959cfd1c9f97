"""Opening a channel to Tether with a bearer credential, in clear or over TLS."""

from __future__ import annotations

import os
import re
import ssl
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from tether.clients.failures import CommandError, read_text, unreadable

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


@dataclass(frozen=True)
class Tls:
    """How to connect over TLS: the CA that signs the server's certificate
    (None: the system's CAs) and, for mutual TLS, the client's own
    certificate chain and key, all PEM."""

    ca: bytes | None = None
    cert: bytes | None = None
    key: bytes | None = None

    @classmethod
    def from_files(
        cls,
        ca: str | Path | None = None,
        cert: str | Path | None = None,
        key: str | Path | None = None,
    ) -> Tls:
        """The PEM files named (None: not given); raises OSError if one cannot be read."""

        def read(path: str | Path | None) -> bytes | None:
            return None if path is None else Path(path).read_bytes()

        return cls(read(ca), read(cert), read(key))

    def credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(self.ca, self.key, self.cert)


def open_channel(
    address: str,
    token: str,
    *,
    tls: bool | Tls = False,
    options: Sequence[tuple[str, Any]] = (),
) -> grpc.aio.Channel:
    """An async channel whose every call carries the token.

    Args:
        address: the server's host:port; over TLS the host must be one the
            server's certificate names.
        token: the bearer token.
        tls: False for plaintext, True for TLS trusting the system's CAs, or
            a Tls naming the CA and the client certificate.
        options: further gRPC channel options.
    """
    interceptors: list[grpc.aio.ClientInterceptor] = [
        _BearerUnaryUnary(token),
        _BearerUnaryStream(token),
        _BearerStreamUnary(token),
        _BearerStreamStream(token),
    ]
    if tls:
        settings = tls if isinstance(tls, Tls) else Tls()
        return grpc.aio.secure_channel(
            address, settings.credentials(), options=options, interceptors=interceptors
        )
    return grpc.aio.insecure_channel(address, options=options, interceptors=interceptors)


@dataclass(frozen=True)
class _PemFile:
    named: str  # the flag or variable that named it
    path: str
    data: bytes


def _pem_file(flag: str, env: str, given: str | None) -> _PemFile | None:
    path = given or os.environ.get(env)
    if not path:
        return None
    named = flag if given else env
    fix = "give a PEM file"
    try:
        data = Path(path).read_bytes()
    except OSError as error:
        raise unreadable(named, path, error, fix) from None
    if b"-----BEGIN " not in data:
        raise CommandError(f"{named} {path}: not a PEM file; {fix}")
    return _PemFile(named, path, data)


def _check_usable(ca: _PemFile | None, cert: _PemFile | None, key: _PemFile | None) -> None:
    """gRPC fails the call on PEM it cannot use, after logging several lines;
    Python's ssl says which file is wrong first."""
    if ca is not None:
        try:
            ssl.create_default_context(cadata=ca.data.decode("ascii", "replace"))
        except (ssl.SSLError, ValueError):
            raise CommandError(
                f"{ca.named} {ca.path}: no usable certificate in it; give the PEM certificate"
                " of the CA that signs the server's certificate"
            ) from None
    if cert is not None and key is not None:
        try:
            ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_cert_chain(cert.path, key.path)
        except ssl.SSLError:
            raise CommandError(
                f"{cert.named} {cert.path} and {key.named} {key.path} are not a certificate and"
                " its key; give the PEM client certificate and the key it was issued with"
            ) from None


def resolve_tls(tls: bool, ca: str | None, cert: str | None, key: str | None) -> bool | Tls:
    """--ca / --cert / --key, else $TETHER_CA_FILE / $TETHER_CERT_FILE /
    $TETHER_KEY_FILE; any of them (or --tls) means TLS."""
    files = (
        _pem_file("--ca", "TETHER_CA_FILE", ca),
        _pem_file("--cert", "TETHER_CERT_FILE", cert),
        _pem_file("--key", "TETHER_KEY_FILE", key),
    )
    ca_file, cert_file, key_file = files
    if (cert_file is None) != (key_file is None):
        raise CommandError(
            "a client certificate needs both --cert and --key "
            "(or TETHER_CERT_FILE and TETHER_KEY_FILE)"
        )
    if files == (None, None, None):
        return tls
    _check_usable(ca_file, cert_file, key_file)
    return Tls(*(None if f is None else f.data for f in files))


_TARGET = re.compile(r"(dns|ipv4|ipv6|unix|unix-abstract|vsock):")
# host:port, the host a name, an IPv4 address or a bracketed IPv6 one.
_ADDRESS = re.compile(r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._-]+):([0-9]{1,5})")


def check_address(address: str, source: str) -> str:
    """The server's address as gRPC takes it, or a CommandError naming where
    it came from (a malformed one would only fail to connect)."""
    if _TARGET.match(address):
        return address  # a gRPC target URI (dns:///host:port, ipv4:a:p,b:p, unix:path)
    found = _ADDRESS.fullmatch(address)
    if found is None or not 1 <= int(found.group(2)) <= 65535:
        hint = " (without a scheme)" if "://" in address else ""
        raise CommandError(
            f"{source} {address[:100]!r}: not host:port{hint}; e.g. 127.0.0.1:50051,"
            " tether.example.com:443, [::1]:50051 or a gRPC target (dns:///host:port)"
        )
    return address


def resolve_token(token: str | None, token_file: str | None) -> str:
    """--token, else --token-file, else $TETHER_TOKEN, else $TETHER_TOKEN_FILE."""
    if token:
        return _bearer(token, "--token")
    path = token_file or os.environ.get("TETHER_TOKEN_FILE")
    if not path and os.environ.get("TETHER_TOKEN"):
        return _bearer(os.environ["TETHER_TOKEN"], "TETHER_TOKEN")
    if not path:
        raise CommandError("no credential: pass --token or --token-file, or set TETHER_TOKEN")
    flag = "--token-file" if token_file else "TETHER_TOKEN_FILE"
    fix = "give the file that holds your token (tether-admin create-credential --token-only)"
    read = read_text(flag, path, fix).strip()
    if not read:
        raise CommandError(f"{flag} {path}: the file is empty; {fix}")
    return _bearer(read, f"{flag} {path}")


# What a bearer token can hold: a header value, visible ASCII (tokens that
# tether-admin issues are far shorter, and never hold a blank).
_TOKEN = re.compile(r"[!-~]{1,4096}")


def _bearer(token: str, source: str) -> str:
    if not _TOKEN.fullmatch(token):
        raise CommandError(
            f"{source}: not a token (a token is one word of visible ASCII characters); "
            "give the token tether-admin create-credential --token-only printed"
        )
    return token
