"""TLS for the gRPC port and the guard's web side: the certificate files
named in the settings, reread when they change, and the client
certificate's subject a credential may be bound to.

Reloading needs no restart and no timer: gRPC asks a fetcher for the
certificate configuration on every handshake (the web side asks in its
ClientHello callback), and the fetcher answers "unchanged" after one stat
per file unless a file's mtime, size or inode moved.
"""

from __future__ import annotations

import ipaddress
import os
import re
import socket
import ssl
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import grpc

from tether.server import logs
from tether.server.settings import Settings

log = logs.get(__name__)

# Where grpc puts the verified client certificate's subject (RFC 2253
# order, e.g. "CN=acme-backend,O=ACME") in a call's auth context.
SUBJECT_KEY = "x509_subject"
MAX_SUBJECT_LENGTH = 500


@dataclass(frozen=True)
class TlsFiles:
    cert: Path
    key: Path
    # Set: clients must present a certificate signed by one of these CAs.
    client_ca: Path | None = None

    @classmethod
    def from_settings(cls, settings: Settings) -> TlsFiles | None:
        """The files to serve TLS with, or None for plaintext; a half-made
        configuration is refused with the setting to fix."""
        cert, key, ca = settings.tls_cert_file, settings.tls_key_file, settings.tls_client_ca_file
        if bool(cert) != bool(key):
            raise SystemExit(
                "TLS needs both TETHER_TLS_CERT_FILE and TETHER_TLS_KEY_FILE; only one is set"
            )
        if ca and not cert:
            raise SystemExit(
                "TETHER_TLS_CLIENT_CA_FILE turns on mutual TLS, which needs "
                "TETHER_TLS_CERT_FILE and TETHER_TLS_KEY_FILE too"
            )
        if not cert:
            return None
        return cls(Path(cert), Path(key), Path(ca) if ca else None)

    @property
    def paths(self) -> list[Path]:
        return [self.cert, self.key] + ([self.client_ca] if self.client_ca else [])


# Per file: mtime, size and inode; a rename over the file changes the inode.
Signature = tuple[tuple[int, int, int], ...]


@dataclass(frozen=True)
class Loaded:
    cert_pem: bytes
    key_pem: bytes
    client_ca_pem: bytes | None


class CertificateWatcher:
    """The files' contents, read again only when one of them changed."""

    def __init__(self, files: TlsFiles) -> None:
        self._files = files
        self._seen: Signature | None = None
        self._refused: Signature | None = None

    def _signature(self) -> Signature:
        stats = [os.stat(path) for path in self._files.paths]
        return tuple((s.st_mtime_ns, s.st_size, s.st_ino) for s in stats)

    def load(self) -> Loaded:
        """The files as they are now, checked; raises ssl.SSLError or OSError."""
        files = self._files
        check = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        # Refuses a key that does not belong to the certificate, which gRPC
        # would only notice at the first handshake.
        check.load_cert_chain(files.cert, files.key)
        if files.client_ca is not None:
            check.load_verify_locations(files.client_ca)
        return Loaded(
            files.cert.read_bytes(),
            files.key.read_bytes(),
            files.client_ca.read_bytes() if files.client_ca else None,
        )

    def first(self) -> Loaded:
        """The files at start-up; a problem is one line naming the file."""
        try:
            signature = self._signature()
            loaded = self.load()
        except ssl.SSLError as exc:  # before OSError, its base
            raise SystemExit(
                f"the TLS files are not a usable certificate, key and CA ({exc.reason or exc}): "
                "check TETHER_TLS_CERT_FILE, TETHER_TLS_KEY_FILE and TETHER_TLS_CLIENT_CA_FILE"
            ) from exc
        except OSError as exc:
            raise SystemExit(
                f"cannot read the TLS file {exc.filename}: {exc.strerror}; "
                "check TETHER_TLS_CERT_FILE, TETHER_TLS_KEY_FILE and TETHER_TLS_CLIENT_CA_FILE"
            ) from exc
        self._seen = signature
        return loaded

    def changed(self) -> Loaded | None:
        """The files' new contents if they changed since last read, else None.

        A change that does not load (a key written before its certificate,
        a file moved away) keeps the previous files in service and is logged
        once; the next handshake tries again.
        """
        signature: Signature | None = None
        try:
            signature = self._signature()
            if signature == self._seen:
                return None
            loaded = self.load()
            if self._signature() != signature:
                return None  # still being written: read it on a later handshake
        except (OSError, ssl.SSLError) as exc:
            if signature is None or signature != self._refused:
                self._refused = signature
                log.warning(
                    "TLS files changed but do not load; serving the previous ones",
                    error=str(exc),
                )
            return None
        self._seen = signature
        log.info("TLS certificates reloaded", cert=str(self._files.cert))
        return loaded


def _grpc_configuration(loaded: Loaded) -> grpc.ServerCertificateConfiguration:
    return grpc.ssl_server_certificate_configuration(
        [(loaded.key_pem, loaded.cert_pem)], root_certificates=loaded.client_ca_pem
    )


def server_credentials(files: TlsFiles) -> grpc.ServerCredentials:
    """Credentials for add_secure_port that follow the files as they change."""
    watcher = CertificateWatcher(files)
    initial = _grpc_configuration(watcher.first())

    def fetch() -> grpc.ServerCertificateConfiguration | None:
        # Runs in gRPC's handshake path: never raise, and answer None
        # ("keep the current configuration") unless the files changed.
        try:
            loaded = watcher.changed()
        except Exception:
            log.exception("TLS reload failed; serving the previous certificate")
            return None
        return None if loaded is None else _grpc_configuration(loaded)

    return grpc.dynamic_ssl_server_credentials(
        initial,
        # grpc documents None as "no change"; its type stubs leave it out.
        fetch,  # type: ignore[arg-type]
        require_client_authentication=files.client_ca is not None,
    )


def web_context(files: TlsFiles) -> ssl.SSLContext:
    """An HTTPS server context for the certificate and key (browsers bring
    no client certificate), moved onto a fresh context when the files change."""
    watcher = CertificateWatcher(files)
    watcher.first()

    def fresh() -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(files.cert, files.key)
        return context

    front, current = fresh(), [fresh()]

    def on_client_hello(
        connection: ssl.SSLSocket | ssl.SSLObject, _name: str | None, _ctx: ssl.SSLContext
    ) -> None:
        # OpenSSL calls this on every ClientHello, with or without SNI.
        try:
            if watcher.changed() is not None:
                current[0] = fresh()
        except Exception:
            log.exception("TLS reload failed; serving the previous certificate")
        connection.context = current[0]

    front.sni_callback = on_client_hello
    return front


def mode(settings: Settings) -> str:
    """How the gRPC port is served, for the start-up log: off, on or mutual."""
    if not settings.tls_cert_file:
        return "off"
    return "mutual" if settings.tls_client_ca_file else "on"


def is_loopback(address: str) -> bool:
    """Whether host:port listens only where other machines cannot reach."""
    host = address.rpartition(":")[0].strip("[]")
    if not host:
        return False  # ":50051": every interface
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    try:
        resolved = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except OSError:
        return False
    return bool(resolved) and all(
        ipaddress.ip_address(str(sockaddr[0]).split("%")[0]).is_loopback
        for *_rest, sockaddr in resolved
    )


def check_plaintext_allowed(settings: Settings, files: TlsFiles | None) -> None:
    """Refuses to carry bearer tokens in clear beyond this machine, unless
    TETHER_ALLOW_PLAINTEXT says something else (a TLS proxy) protects them."""
    if files is not None or settings.allow_plaintext or is_loopback(settings.listen):
        return
    raise SystemExit(
        f"refusing to listen on {settings.listen} without TLS: bearer tokens would cross "
        "the network in clear; set TETHER_TLS_CERT_FILE and TETHER_TLS_KEY_FILE, or "
        "TETHER_ALLOW_PLAINTEXT=true when a TLS-terminating proxy or private network "
        "protects the port"
    )


_RDN = re.compile(r"(?<!\\),")


def normalize_subject(subject: str) -> str:
    """A distinguished name in one spelling: attribute types upper-cased,
    spaces around separators dropped ("cn = a, o=B" -> "CN=a,O=B")."""
    parts = []
    for rdn in _RDN.split(subject.strip()):
        kind, sep, value = rdn.partition("=")
        parts.append(f"{kind.strip().upper()}{sep}{value.strip()}")
    return ",".join(parts)


def subject_problem(subject: str) -> str | None:
    """Why subject is not a distinguished name one can bind to, or None."""
    if len(subject) > MAX_SUBJECT_LENGTH:
        return f"at most {MAX_SUBJECT_LENGTH} characters"
    for rdn in _RDN.split(subject):
        kind, sep, value = rdn.partition("=")
        if not sep or not re.fullmatch(r"\s*[A-Za-z][A-Za-z0-9.-]*\s*", kind) or not value.strip():
            return "a distinguished name in RFC 4514 form, e.g. 'CN=acme-backend,O=ACME'"
    return None


def peer_subject(auth_context: Mapping[str, Iterable[bytes]]) -> str | None:
    """The verified client certificate's subject, if the peer presented one."""
    for value in auth_context.get(SUBJECT_KEY, ()):
        return value.decode("utf-8", "replace")
    return None


def subject_matches(bound: str, auth_context: Mapping[str, Iterable[bytes]]) -> bool:
    presented = peer_subject(auth_context)
    return presented is not None and normalize_subject(presented) == normalize_subject(bound)
