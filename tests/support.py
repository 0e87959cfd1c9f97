"""Helpers the tests share: start a server, make credentials, read errors."""

from __future__ import annotations

import secrets
import socket
from collections.abc import Awaitable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest

from tether.admin.v1 import messages_pb2 as admin_pb
from tether.admin.v1 import service_pb2_grpc as admin_grpc
from tether.clients.connection import Tls, open_channel
from tether.clients.errors import ErrorDetail, details_of
from tether.server.app import App, build
from tether.server.settings import Settings
from tether.server.shared import digests
from tether.server.storage import migrate
from tether.server.transport.credentials import create_admin

KINDS = {
    "device": admin_pb.CREDENTIAL_KIND_DEVICE,
    "partner": admin_pb.CREDENTIAL_KIND_PARTNER,
    "internal": admin_pb.CREDENTIAL_KIND_INTERNAL,
    "admin": admin_pb.CREDENTIAL_KIND_ADMIN,
}


def free_port() -> int:
    """A TCP port nobody listens on right now, for a process the test starts."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class RunningServer:
    app: App
    admin_token: str
    # How channel() connects: plaintext, or TLS as a client library would.
    tls: bool | Tls = False
    _channels: list[grpc.aio.Channel] = field(default_factory=list)

    @property
    def address(self) -> str:
        return self.app.address

    def channel(self, token: str) -> grpc.aio.Channel:
        """A channel whose calls carry token; closed when the server stops."""
        channel = open_channel(self.address, token, tls=self.tls)
        self._channels.append(channel)
        return channel

    def app_services(self) -> list[str]:
        """Every Tether gRPC service the server registered."""
        return [name for c in self.app.components for name in c.services]

    def admin(self) -> admin_grpc.AdminAsyncStub:
        return admin_grpc.AdminStub(self.channel(self.admin_token))

    async def credential(self, kind: str, partner_id: str = "") -> str:
        response = await self.admin().CreateCredential(
            admin_pb.CreateCredentialRequest(
                kind=KINDS[kind], partner_id=partner_id, label=f"test {kind}"
            )
        )
        return response.token

    async def partner(
        self,
        services: tuple[str, ...] = ("free-data",),
        rebind_policy: admin_pb.RebindPolicy.ValueType = admin_pb.REBIND_POLICY_REFUSE,
    ) -> tuple[str, str]:
        """A new partner with preset services; returns (partner_id, partner token)."""
        partner_id = f"p-{secrets.token_hex(5)}"
        admin = self.admin()
        await admin.CreatePartner(
            admin_pb.CreatePartnerRequest(
                request_id=secrets.token_hex(8),
                partner_id=partner_id,
                display_name=f"Partner {partner_id}",
                rebind_policy=rebind_policy,
            )
        )
        for service_id in services:
            await admin.CreateService(
                admin_pb.CreateServiceRequest(
                    request_id=secrets.token_hex(8),
                    partner_id=partner_id,
                    service_id=service_id,
                    display_name=service_id,
                )
            )
        return partner_id, await self.credential("partner", partner_id)

    async def stop(self) -> None:
        for channel in self._channels:
            await channel.close()
        await self.app.stop(grace=1)


async def start_server(
    *,
    database_url: str,
    redis_url: str,
    data_dir: Path,
    tracer_provider: Any = None,
    # Any: callers spread **overrides dicts of one value type.
    interceptors: Any = (),
    **overrides: Any,
) -> RunningServer:
    await migrate.upgrade_async(database_url)
    settings = Settings(
        database_url=database_url,
        redis_url=redis_url,
        data_dir=data_dir,
        **{
            "listen": "127.0.0.1:0",
            "digest_keys": digests.new_key_spec("test"),
            "credential_cache_seconds": 0.0,
            # Exactness tests queue a thousand calls at once on a loaded test
            # machine: that queue is not an outage. Outage tests set their own bound.
            "redis_timeout_seconds": 2.0,
            **overrides,
        },
    )
    app = await build(settings, interceptors=interceptors, tracer_provider=tracer_provider)
    await app.start()
    return RunningServer(app, await create_admin(app.runtime.db, "tests"))


async def expect_error(
    call: Awaitable[Any], code: grpc.StatusCode, reason: str = ""
) -> ErrorDetail:
    """Awaits a call that must fail with code (and reason, if given)."""
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    detail = details_of(caught.value)
    assert detail.code == code, f"{detail.code} {detail.message}"
    if reason:
        assert detail.reason == reason, f"{detail.reason} {detail.message}"
    return detail
