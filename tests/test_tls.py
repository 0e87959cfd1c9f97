"""TLS on the gRPC port and the guard's web side: calls over TLS and mutual
TLS, credentials bound to a client certificate, certificates replaced
without a restart, and every way a connection can be wrong ending in an
error that says what to fix (for the CLIs: one line, exit 2)."""

from __future__ import annotations

import secrets
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import grpc
import pytest

from tests.guard_support import web_of
from tests.support import RunningServer, expect_error, start_server
from tests.test_cli_errors import only_line, run
from tests.tls_support import Issued, client_tls, issue, write_ca
from tether.admin.v1 import messages_pb2 as admin_pb
from tether.admin.v1 import service_pb2_grpc as admin_grpc
from tether.clients.connection import Tls, open_channel
from tether.server.app import build
from tether.server.settings import Settings
from tether.server.shared import digests
from tether.server.transport import tls

# Each test's channels connect afresh: gRPC would otherwise share one
# connection between channels, and a reloaded certificate shows only on a
# new handshake.
OWN_CONNECTION = [("grpc.use_local_subchannel_pool", 1)]
MISMATCH = "ERROR_REASON_CLIENT_CERTIFICATE_MISMATCH"


@dataclass(frozen=True)
class Pki:
    folder: Path
    ca: Issued
    ca_file: Path
    server: Issued
    client_a: Issued
    client_b: Issued
    # Trusted by nobody: a stranger's CA, and a certificate it signed.
    other_ca: Issued
    other_ca_file: Path
    stranger: Issued


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    folder = tmp_path_factory.mktemp("pki")
    ca = issue("Tether test CA", role="ca")
    other_ca = issue("Another CA", role="ca")
    return Pki(
        folder=folder,
        ca=ca,
        ca_file=write_ca(folder, "ca", ca),
        server=issue("tether-server", ca, role="server"),
        client_a=issue("acme-backend", ca),
        client_b=issue("other-backend", ca),
        other_ca=other_ca,
        other_ca_file=write_ca(folder, "other-ca", other_ca),
        stranger=issue("acme-backend", other_ca),
    )


async def start_tls_server(
    postgres_url: str,
    redis_url: str,
    folder: Path,
    served: Issued,
    *,
    client_ca: Path | None = None,
    admin_tls: Tls,
) -> RunningServer:
    cert_file, key_file = served.write(folder, "server")
    server = await start_server(
        database_url=postgres_url,
        redis_url=redis_url,
        data_dir=folder,
        database_pool_size=2,
        tls_cert_file=str(cert_file),
        tls_key_file=str(key_file),
        tls_client_ca_file=str(client_ca or ""),
    )
    server.tls = admin_tls
    return server


@pytest.fixture(scope="module")
async def tls_server(
    postgres_url: str, redis_url: str, pki: Pki, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[RunningServer]:
    """TLS without client certificates."""
    folder = tmp_path_factory.mktemp("tls-server")
    server = await start_tls_server(
        postgres_url, redis_url, folder, pki.server, admin_tls=client_tls(pki.ca)
    )
    yield server
    await server.stop()


@pytest.fixture(scope="module")
async def mtls_server(
    postgres_url: str, redis_url: str, pki: Pki, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[RunningServer]:
    """Mutual TLS: clients must present a certificate signed by the test CA."""
    folder = tmp_path_factory.mktemp("mtls-server")
    server = await start_tls_server(
        postgres_url,
        redis_url,
        folder,
        pki.server,
        client_ca=pki.ca_file,
        admin_tls=client_tls(pki.ca, pki.client_a),
    )
    yield server
    await server.stop()


async def list_partners(server: RunningServer, token: str, connect: bool | Tls) -> None:
    async with open_channel(server.address, token, tls=connect, options=OWN_CONNECTION) as channel:
        await admin_grpc.AdminStub(channel).ListPartners(admin_pb.ListPartnersRequest())


async def connection_error(server: RunningServer, connect: bool | Tls) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await list_partners(server, server.admin_token, connect)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE, caught.value.details()
    return caught.value


# --- the gRPC port -------------------------------------------------------------------


async def test_a_call_over_tls_reaches_the_server(tls_server: RunningServer, pki: Pki) -> None:
    partner_id, _ = await tls_server.partner()
    async with open_channel(
        tls_server.address, tls_server.admin_token, tls=client_tls(pki.ca)
    ) as channel:
        response = await admin_grpc.AdminStub(channel).GetPartner(
            admin_pb.GetPartnerRequest(partner_id=partner_id)
        )
    assert response.partner.partner_id == partner_id


async def test_mutual_tls_admits_a_client_certificate_its_ca_signed(
    mtls_server: RunningServer, pki: Pki, tmp_path: Path
) -> None:
    cert_file, key_file = pki.client_b.write(tmp_path, "client")
    client = Tls.from_files(pki.ca_file, cert_file, key_file)
    await list_partners(mtls_server, mtls_server.admin_token, client)


async def test_mutual_tls_refuses_a_client_without_a_certificate_or_with_a_strangers(
    mtls_server: RunningServer, pki: Pki
) -> None:
    for client in (client_tls(pki.ca), client_tls(pki.ca, pki.stranger)):
        await connection_error(mtls_server, client)


async def test_a_client_trusting_another_ca_is_told_the_certificate_was_refused(
    tls_server: RunningServer, pki: Pki
) -> None:
    error = await connection_error(tls_server, client_tls(pki.other_ca))
    assert "CERTIFICATE_VERIFY_FAILED" in (error.details() or "")


async def test_a_plaintext_client_of_a_tls_server_fails_unavailable(
    tls_server: RunningServer,
) -> None:
    await connection_error(tls_server, False)


async def test_an_expired_server_certificate_is_refused_as_expired(
    postgres_url: str, redis_url: str, pki: Pki, tmp_path: Path
) -> None:
    expired = issue("tether-server", pki.ca, role="server", valid_days=(-30, -1))
    server = await start_tls_server(
        postgres_url, redis_url, tmp_path, expired, admin_tls=client_tls(pki.ca)
    )
    try:
        error = await connection_error(server, client_tls(pki.ca))
        assert "certificate has expired" in (error.details() or "")
        code, _, err = await run(
            server, server.admin_token, "tether-admin", "--ca", str(pki.ca_file), "partners"
        )
        assert code == 2
        assert "(certificate has expired)" in only_line(err)
    finally:
        await server.stop()


async def test_certificates_replaced_on_disk_serve_the_next_connection(
    postgres_url: str, redis_url: str, pki: Pki, tmp_path: Path
) -> None:
    server = await start_tls_server(
        postgres_url, redis_url, tmp_path, pki.server, admin_tls=client_tls(pki.ca)
    )
    try:
        trusts_old, trusts_new = client_tls(pki.ca), client_tls(pki.other_ca)
        await list_partners(server, server.admin_token, trusts_old)
        await connection_error(server, trusts_new)
        web = web_of(server)
        assert await web_status(web.url, pki.ca) == 200

        # A certificate from another CA, as a renewal moving CAs would bring.
        issue("tether-server", pki.other_ca, role="server").write(tmp_path, "server")

        await list_partners(server, server.admin_token, trusts_new)
        await connection_error(server, trusts_old)
        assert await web_status(web.url, pki.other_ca) == 200
        with pytest.raises(aiohttp.ClientConnectorCertificateError):
            await web_status(web.url, pki.ca)
    finally:
        await server.stop()


async def test_a_key_that_does_not_match_keeps_the_previous_certificate(
    postgres_url: str, redis_url: str, pki: Pki, tmp_path: Path
) -> None:
    server = await start_tls_server(
        postgres_url, redis_url, tmp_path, pki.server, admin_tls=client_tls(pki.ca)
    )
    try:
        # Half of a renewal: the new key is in place, its certificate not yet.
        renewed = issue("tether-server", pki.other_ca, role="server")
        (tmp_path / "server.key").write_bytes(renewed.key_pem)
        await list_partners(server, server.admin_token, client_tls(pki.ca))
    finally:
        await server.stop()


# --- credentials bound to a client certificate --------------------------------------


async def bound_partner(server: RunningServer, subject: str) -> tuple[str, str]:
    partner_id, _ = await server.partner()
    response = await server.admin().CreateCredential(
        admin_pb.CreateCredentialRequest(
            kind=admin_pb.CREDENTIAL_KIND_PARTNER, partner_id=partner_id, client_subject=subject
        )
    )
    return response.credential.client_subject, response.token


async def partner_services(server: RunningServer, token: str, connect: Tls) -> None:
    async with open_channel(server.address, token, tls=connect, options=OWN_CONNECTION) as channel:
        await admin_grpc.AdminStub(channel).ListServices(admin_pb.ListServicesRequest())


async def test_a_bound_credential_works_only_with_its_client_certificate(
    mtls_server: RunningServer, tls_server: RunningServer, pki: Pki
) -> None:
    # Spelled loosely; stored as the certificate's subject reads.
    stored, token = await bound_partner(mtls_server, " cn=acme-backend, o=Tether tests ")
    assert stored == pki.client_a.subject == "CN=acme-backend,O=Tether tests"

    await partner_services(mtls_server, token, client_tls(pki.ca, pki.client_a))
    await expect_error(
        partner_services(mtls_server, token, client_tls(pki.ca, pki.client_b)),
        grpc.StatusCode.UNAUTHENTICATED,
        MISMATCH,
    )
    # The same database behind a server without mutual TLS: no certificate at all.
    await expect_error(
        partner_services(tls_server, token, client_tls(pki.ca)),
        grpc.StatusCode.UNAUTHENTICATED,
        MISMATCH,
    )


async def test_an_unbound_credential_works_with_any_client_certificate(
    mtls_server: RunningServer, pki: Pki
) -> None:
    _, token = await mtls_server.partner()
    for client in (pki.client_a, pki.client_b):
        await partner_services(mtls_server, token, client_tls(pki.ca, client))


async def test_a_subject_that_is_no_distinguished_name_is_refused(
    tls_server: RunningServer,
) -> None:
    partner_id, _ = await tls_server.partner()
    for subject in ("acme-backend", "CN=", "=x", "CN=a," + "O=b," * 200):
        detail = await expect_error(
            tls_server.admin().CreateCredential(
                admin_pb.CreateCredentialRequest(
                    kind=admin_pb.CREDENTIAL_KIND_PARTNER,
                    partner_id=partner_id,
                    client_subject=subject,
                )
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
            "ERROR_REASON_INVALID_FIELD",
        )
        assert set(detail.violations) == {"client_subject"}


# --- settings the server refuses -----------------------------------------------------


def settings(tmp_path: Path, **values: str | bool) -> Settings:
    return Settings(
        data_dir=tmp_path,
        database_url=f"sqlite+aiosqlite:///{tmp_path / 'tether.db'}",
        redis_url="redis://127.0.0.1:6379/0",
        digest_keys=digests.new_key_spec(),
        **values,  # type: ignore[arg-type]
    )


async def test_the_server_refuses_plaintext_beyond_loopback(tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as refused:
        await build(settings(tmp_path, listen="0.0.0.0:0"))
    message = str(refused.value.code)
    assert "\n" not in message
    assert message.startswith("refusing to listen on 0.0.0.0:0 without TLS")
    assert "TETHER_TLS_CERT_FILE" in message and "TETHER_ALLOW_PLAINTEXT=true" in message
    for listen in (":0", "[::]:0"):
        with pytest.raises(SystemExit, match="without TLS"):
            await build(settings(tmp_path, listen=listen))


def test_loopback_is_only_this_machine() -> None:
    for address in ("127.0.0.1:50051", "127.0.0.2:1", "[::1]:50051", "localhost:50051"):
        assert tls.is_loopback(address), address
    for address in ("0.0.0.0:50051", ":50051", "[::]:50051", "192.0.2.10:50051"):
        assert not tls.is_loopback(address), address


async def test_plaintext_beyond_loopback_starts_when_allowed(
    postgres_url: str, redis_url: str, tmp_path: Path
) -> None:
    server = await start_server(
        database_url=postgres_url,
        redis_url=redis_url,
        data_dir=tmp_path,
        database_pool_size=2,
        listen="0.0.0.0:0",
        allow_plaintext=True,
    )
    try:
        await list_partners(server, server.admin_token, False)
    finally:
        await server.stop()


async def test_half_a_tls_configuration_is_refused_with_the_setting_to_fix(
    tmp_path: Path, pki: Pki
) -> None:
    cert_file, _ = pki.server.write(tmp_path, "server")
    for values, expected in (
        ({"tls_cert_file": str(cert_file)}, "TETHER_TLS_KEY_FILE"),
        ({"tls_client_ca_file": str(pki.ca_file)}, "TETHER_TLS_CERT_FILE"),
        (
            {"tls_cert_file": str(cert_file), "tls_key_file": str(tmp_path / "none.key")},
            "cannot read the TLS file",
        ),
    ):
        with pytest.raises(SystemExit, match=expected):
            await build(settings(tmp_path, listen="127.0.0.1:0", **values))
    mismatched = issue("other", pki.ca, role="server")
    (tmp_path / "other.key").write_bytes(mismatched.key_pem)
    with pytest.raises(SystemExit, match="not a usable certificate"):
        await build(
            settings(
                tmp_path,
                listen="127.0.0.1:0",
                tls_cert_file=str(cert_file),
                tls_key_file=str(tmp_path / "other.key"),
            )
        )


# --- the web side --------------------------------------------------------------------


async def web_status(url: str, trusted: Issued) -> int:
    context = ssl.create_default_context(cadata=trusted.cert_pem.decode())
    async with aiohttp.ClientSession() as session, session.get(f"{url}/", ssl=context) as response:
        return response.status


async def test_the_web_side_serves_https_with_the_same_certificate(
    tls_server: RunningServer, pki: Pki
) -> None:
    web = web_of(tls_server)
    assert web.url.startswith("https://")
    assert await web_status(web.url, pki.ca) == 200


# --- the command-line tools ----------------------------------------------------------


async def test_a_cli_over_mutual_tls_binds_a_credential_to_its_certificate(
    mtls_server: RunningServer, pki: Pki, tmp_path: Path
) -> None:
    partner_id, _ = await mtls_server.partner()
    cert_file, key_file = pki.client_a.write(tmp_path, "client")
    tls_flags = ["--ca", str(pki.ca_file), "--cert", str(cert_file), "--key", str(key_file)]
    code, out, err = await run(
        mtls_server,
        mtls_server.admin_token,
        "tether-admin",
        *tls_flags,
        "create-credential",
        "partner",
        "--partner",
        partner_id,
        "--client-subject",
        pki.client_a.subject,
    )
    assert code == 0, err
    assert f'"clientSubject": "{pki.client_a.subject}"' in out
    # The same through the environment.
    code, out, err = await run(
        mtls_server,
        mtls_server.admin_token,
        "tether-admin",
        "credentials",
        "--partner",
        partner_id,
        env={
            "TETHER_CA_FILE": str(pki.ca_file),
            "TETHER_CERT_FILE": str(cert_file),
            "TETHER_KEY_FILE": str(key_file),
        },
    )
    assert code == 0, err
    assert pki.client_a.subject in out


async def test_cli_tls_mistakes_are_one_line_each(
    tls_server: RunningServer, mtls_server: RunningServer, pki: Pki, tmp_path: Path
) -> None:
    address = tls_server.address
    client_cert, client_key = pki.client_a.write(tmp_path, "client")
    _, other_key = pki.client_b.write(tmp_path, "other")
    cases = [
        (
            tls_server,
            ["--ca", str(pki.other_ca_file)],
            f"error: the certificate of the server at {address} was refused"
            " (unable to get local issuer certificate)",
        ),
        (tls_server, [], f"error: the server at {address} requires TLS; pass --ca"),
        (
            mtls_server,
            ["--ca", str(pki.ca_file)],
            f"error: the server at {mtls_server.address} closed the connection during the TLS"
            " handshake: it requires a client certificate",
        ),
        (
            tls_server,
            ["--ca", str(tmp_path / "missing.pem")],
            f"error: --ca {tmp_path / 'missing.pem'}: no such file",
        ),
        (
            tls_server,
            ["--ca", str(pki.ca_file), "--cert", str(pki.ca_file)],
            "error: a client certificate needs both --cert and --key",
        ),
        (
            tls_server,
            ["--ca", str(client_key)],
            f"error: --ca {client_key}: no usable certificate in it",
        ),
        (
            tls_server,
            ["--ca", str(pki.ca_file), "--cert", str(client_cert), "--key", str(other_key)],
            f"error: --cert {client_cert} and --key {other_key} are not a certificate and its key",
        ),
    ]
    for server, flags, expected in cases:
        code, _, err = await run(server, server.admin_token, "tether-admin", *flags, "partners")
        assert code == 2, err
        assert only_line(err).startswith(expected), err
    # And a TLS client of a plaintext server.
    plain = await start_server(
        database_url=tls_server.app.settings.effective_database_url,
        redis_url=tls_server.app.settings.redis_url,
        data_dir=tmp_path,
        database_pool_size=2,
    )
    try:
        code, _, err = await run(
            plain, plain.admin_token, "tether-admin", "--ca", str(pki.ca_file), "partners"
        )
        assert code == 2
        assert only_line(err).startswith(f"error: the server at {plain.address} does not speak TLS")
    finally:
        await plain.stop()


async def test_cli_over_tls_with_ca_works(tls_server: RunningServer, pki: Pki) -> None:
    partner_id = f"p-{secrets.token_hex(4)}"
    code, out, err = await run(
        tls_server,
        tls_server.admin_token,
        "tether-admin",
        "--ca",
        str(pki.ca_file),
        "create-partner",
        partner_id,
        "--name",
        "Over TLS",
    )
    assert code == 0, err
    assert partner_id in out


async def test_commands_that_reconnect_stop_at_a_refused_certificate(
    tls_server: RunningServer, pki: Pki
) -> None:
    # A server restarting is worth waiting for; a CA that will never match is not.
    _, partner_token = await tls_server.partner()
    device_token = await tls_server.credential("device")
    wrong_ca = ["--ca", str(pki.other_ca_file)]
    for token, command in (
        (device_token, ["tether-device", *wrong_ca, "watch", "--imei", "490154203237518"]),
        (partner_token, ["tether-partner", *wrong_ca, "serve"]),
    ):
        code, _, err = await run(tls_server, token, *command)
        assert code == 2, err
        assert "(unable to get local issuer certificate)" in only_line(err)
