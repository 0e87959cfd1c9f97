"""Certificates made for the TLS tests: a CA, server and client certificates
signed by it (valid or expired), written as PEM files."""

from __future__ import annotations

import datetime
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tether.clients.connection import Tls


@dataclass(frozen=True)
class Issued:
    """A certificate and its key (PEM), and what signs further certificates."""

    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    @property
    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    @property
    def key_pem(self) -> bytes:
        return self.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    @property
    def subject(self) -> str:
        return self.cert.subject.rfc4514_string()

    def write(self, folder: Path, name: str) -> tuple[Path, Path]:
        """(cert file, key file), each replaced in one rename as an operator's
        deployment tool would."""
        paths = folder / f"{name}.pem", folder / f"{name}.key"
        for path, data in zip(paths, (self.cert_pem, self.key_pem), strict=True):
            staged = path.with_suffix(path.suffix + ".new")
            staged.write_bytes(data)
            os.replace(staged, path)
        return paths


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Tether tests"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def issue(
    common_name: str,
    issuer: Issued | None = None,
    *,
    role: str = "client",
    valid_days: tuple[int, int] = (-1, 30),
) -> Issued:
    """A certificate for role "ca", "server" (for 127.0.0.1 and localhost) or
    "client", signed by issuer (self-signed without one), valid from
    valid_days[0] to valid_days[1] days from now."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(issuer.cert.subject if issuer else _name(common_name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now + datetime.timedelta(days=valid_days[0]))
        .not_valid_after(now + datetime.timedelta(days=valid_days[1]))
        .add_extension(x509.BasicConstraints(ca=role == "ca", path_length=None), critical=True)
    )
    if role == "server":
        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        ).add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
    elif role == "client":
        builder = builder.add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False
        )
    cert = builder.sign(issuer.key if issuer else key, hashes.SHA256())
    return Issued(cert, key)


def write_ca(folder: Path, name: str, ca: Issued) -> Path:
    path = folder / f"{name}.pem"
    path.write_bytes(ca.cert_pem)
    return path


def client_tls(ca: Issued, client: Issued | None = None) -> Tls:
    """What a client passes to trust ca and, given one, present client."""
    if client is None:
        return Tls(ca=ca.cert_pem)
    return Tls(ca=ca.cert_pem, cert=client.cert_pem, key=client.key_pem)
