"""Bad input gets the right status and writes nothing."""

from __future__ import annotations

import grpc
import redis.asyncio as redis
from sqlalchemy import func, select

from tests.guard_support import fingerprint, guard_client, guard_of, new_service
from tests.support import RunningServer, expect_error
from tether.clients.guard.client import GuardClient, account
from tether.guard.v1 import messages_pb2 as pb
from tether.server.guard.tables import GuardEntry, GuardLink

IP = "198.51.100.7"


async def _nothing_written(server: RunningServer, redis_url: str, service: str) -> None:
    await guard_of(server).recorder.flush()
    async with server.app.runtime.db.sessions() as session:
        for table in (GuardEntry, GuardLink):
            rows = await session.scalar(
                select(func.count()).select_from(table).where(table.service_id == service)
            )
            assert rows == 0
    client = redis.Redis.from_url(redis_url)
    try:
        assert [k async for k in client.scan_iter(f"tether:g:{service}:*")] == []
    finally:
        await client.aclose()


async def test_missing_and_malformed_components_are_all_reported(
    pg_server: RunningServer, redis_url: str
) -> None:
    guard = await guard_client(pg_server)
    service = await new_service(guard, register_limit=1)
    bad = fingerprint(browser_name="", screen_width=0, languages=[], fonts=["x" * 129])
    detail = await expect_error(
        guard.evaluate(service, "register", account("bad"), bad, "not-an-ip"),
        grpc.StatusCode.INVALID_ARGUMENT,
        "ERROR_REASON_INVALID_FIELD",
    )
    assert set(detail.violations) == {
        "components.browser_name",
        "components.screen_width",
        "components.languages",
        "components.fonts[0]",
        "client_ip",
    }
    detail = await expect_error(
        guard.stub.Evaluate(
            pb.EvaluateRequest(service_id=service, action=pb.ACTION_REGISTER, client_ip=IP)
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert set(detail.violations) == {"account", "components"}
    await _nothing_written(pg_server, redis_url, service)


async def test_oversized_values_are_refused(pg_server: RunningServer, redis_url: str) -> None:
    guard = await guard_client(pg_server)
    service = await new_service(guard, register_limit=1)
    huge = fingerprint(
        fonts=[f"font {i}" for i in range(600)],
        extra={"canvas": "c" * 2000, "bad key!": "x"},
        platform="p" * 500,
    )
    detail = await expect_error(
        guard.evaluate(service, "register", account("a" * 300), huge, IP),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert {
        "components.fonts",
        "components.platform",
        "components.extra['canvas']",
        "account.value",
    } <= set(detail.violations)
    await expect_error(
        guard.evaluate(service, "collaborate", account("a"), fingerprint(), IP, room_id="r" * 200),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    await _nothing_written(pg_server, redis_url, service)


async def test_unknown_service_is_not_found(pg_server: RunningServer, redis_url: str) -> None:
    guard = await guard_client(pg_server)
    await expect_error(
        guard.evaluate("no-such-service", "register", account("a"), fingerprint(), IP),
        grpc.StatusCode.NOT_FOUND,
        "ERROR_REASON_GUARD_SERVICE_NOT_FOUND",
    )
    await expect_error(
        guard.get_policy("no-such-service"),
        grpc.StatusCode.NOT_FOUND,
        "ERROR_REASON_GUARD_SERVICE_NOT_FOUND",
    )
    await _nothing_written(pg_server, redis_url, "no-such-service")


async def test_wrong_credentials_are_refused(pg_server: RunningServer, redis_url: str) -> None:
    guard = await guard_client(pg_server)
    service = await new_service(guard, register_limit=1)
    device = await guard_client(pg_server, "device")
    await expect_error(
        device.evaluate(service, "register", account("a"), fingerprint(), IP),
        grpc.StatusCode.PERMISSION_DENIED,
        "ERROR_REASON_CALLER_NOT_ALLOWED",
    )
    await expect_error(
        device.set_policy(pb.Policy(service_id=service, register_limit=100)),
        grpc.StatusCode.PERMISSION_DENIED,
    )
    stranger = GuardClient(pg_server.channel("cred_0000000000000000.secret"))
    await expect_error(
        stranger.evaluate(service, "register", account("a"), fingerprint(), IP),
        grpc.StatusCode.UNAUTHENTICATED,
        "ERROR_REASON_CREDENTIAL_INVALID",
    )
    assert (await guard.get_policy(service)).register_limit == 1
    await _nothing_written(pg_server, redis_url, service)


async def test_bad_policies_are_refused_and_not_stored(pg_server: RunningServer) -> None:
    guard = await guard_client(pg_server)
    service = await new_service(guard, register_limit=2)
    detail = await expect_error(
        guard.set_policy(
            pb.Policy(service_id=service, register_limit=-1, allowed_identities=["nope"]),
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert set(detail.violations) == {"policy.register_limit", "policy.allowed_identities[0]"}
    await expect_error(
        guard.set_policy(pb.Policy(service_id=service), only=["update_time"]),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    await expect_error(
        guard.set_policy(pb.Policy(service_id="Bad Name")), grpc.StatusCode.INVALID_ARGUMENT
    )
    assert (await guard.get_policy(service)).register_limit == 2
