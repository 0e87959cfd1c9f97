"""Prometheus metrics, scraped over HTTP from a real server while real gRPC
calls change them; and two worker processes summed by the one that serves."""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests import binding_support as bs
from tests import provisioning_support as ps
from tests.guard_support import fingerprint, guard_client, new_service, private_redis
from tests.provisioning_support import ServerProcess
from tests.support import RunningServer, expect_error, free_port, start_server
from tether.admin.v1 import messages_pb2 as admin_pb
from tether.binding.v1 import messages_pb2 as binding_pb
from tether.binding.v1 import service_pb2_grpc as binding_grpc
from tether.clients.connection import open_channel
from tether.clients.guard.client import account
from tether.common.v1 import types_pb2 as types
from tether.guard.v1 import messages_pb2 as guard_pb
from tether.provisioning.v1 import messages_pb2 as provisioning_pb
from tether.server.observability import fast
from tether.server.shared import digests
from tether.server.storage import migrate

BINDING = "tether.binding.v1.Binding"


@pytest.fixture(scope="module")
async def server(
    postgres_url: str, redis_url: str, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[RunningServer]:
    running = await start_server(
        database_url=postgres_url,
        redis_url=redis_url,
        data_dir=tmp_path_factory.mktemp("metrics"),
        metrics_listen="127.0.0.1:0",
        database_pool_size=3,
    )
    assert running.app.metrics is not None and running.app.metrics.state is not None
    # Every scrape reads SQL again: the tests look right after a change.
    running.app.metrics.state.cache_seconds = 0.0
    yield running
    await running.stop()


async def scrape_url(url: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain")
        text = await response.text()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


async def scrape(server: RunningServer) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    assert server.app.metrics is not None
    return await scrape_url(f"http://127.0.0.1:{server.app.metrics.port}/metrics")


def value(
    samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str
) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def rpc(method: str, code: str = "", service: str = BINDING) -> dict[str, str]:
    labels = {"grpc_service": service, "grpc_method": method, "grpc_type": "unary"}
    if code:
        labels["grpc_code"] = code
    return labels


async def test_a_binding_report_counts_its_outcome_its_rpc_and_the_active_binding(
    server: RunningServer,
) -> None:
    partner_id, partner_token = await server.partner()
    device_token = await server.credential("device")
    before = await scrape(server)

    await ps.bind(server, device_token, partner_token)

    after = await scrape(server)
    report = rpc("ReportAccountUse")
    assert value(after, "tether_binding_reports_total", outcome="bound") == (
        value(before, "tether_binding_reports_total", outcome="bound") + 1
    )
    assert value(after, "grpc_server_started_total", **report) == (
        value(before, "grpc_server_started_total", **report) + 1
    )
    assert value(after, "grpc_server_handled_total", **rpc("ReportAccountUse", "OK")) == (
        value(before, "grpc_server_handled_total", **rpc("ReportAccountUse", "OK")) + 1
    )
    assert value(after, "grpc_server_handling_seconds_count", **report) == (
        value(before, "grpc_server_handling_seconds_count", **report) + 1
    )
    assert value(after, "grpc_server_msg_sent_total", **report) == (
        value(before, "grpc_server_msg_sent_total", **report) + 1
    )
    assert value(after, "tether_bindings_active", partner_id=partner_id) == 1
    assert value(after, "tether_postgres_connection_seconds_count") > value(
        before, "tether_postgres_connection_seconds_count"
    )
    assert (
        value(after, "tether_redis_call_seconds_count", operation="binding.rate_limit")
        == value(before, "tether_redis_call_seconds_count", operation="binding.rate_limit") + 1
    )


async def test_an_import_counts_its_rows_and_rejections_and_stream_messages(
    server: RunningServer,
) -> None:
    _, partner_token = await server.partner()
    entries = [
        binding_pb.EligibleAccountEntry(account=bs.phone_account()),
        binding_pb.EligibleAccountEntry(account=bs.phone_account()),
        binding_pb.EligibleAccountEntry(
            account=types.Account(kind=types.ACCOUNT_KIND_PHONE_NUMBER, value="+99912")
        ),
    ]

    async def requests() -> AsyncIterator[binding_pb.ImportEligibleAccountsRequest]:
        yield binding_pb.ImportEligibleAccountsRequest(
            header=binding_pb.ImportHeader(mode=binding_pb.IMPORT_MODE_APPEND)
        )
        yield binding_pb.ImportEligibleAccountsRequest(
            batch=binding_pb.ImportBatch(entries=entries)
        )

    before = await scrape(server)
    await bs.stub(server, partner_token).ImportEligibleAccounts(requests())
    after = await scrape(server)

    assert value(after, "tether_binding_import_rows_total") == (
        value(before, "tether_binding_import_rows_total") + 2
    )
    assert value(after, "tether_binding_import_rejected_total") == (
        value(before, "tether_binding_import_rejected_total") + 1
    )
    stream = {**rpc("ImportEligibleAccounts"), "grpc_type": "client_stream"}
    assert value(after, "grpc_server_msg_received_total", **stream) == (
        value(before, "grpc_server_msg_received_total", **stream) + 2
    )
    handled = {**stream, "grpc_code": "OK"}
    assert value(after, "grpc_server_handled_total", **handled) == (
        value(before, "grpc_server_handled_total", **handled) + 1
    )


async def test_calls_refused_by_the_server_count_with_their_final_code(
    server: RunningServer,
) -> None:
    before = await scrape(server)
    stranger = bs.stub(server, "not-a-token")
    request = bs.report_request(bs.device(), bs.phone_account())
    await expect_error(stranger.ReportAccountUse(request), grpc.StatusCode.UNAUTHENTICATED)
    device = bs.stub(server, await server.credential("device"))
    malformed = binding_pb.ReportAccountUseRequest(request_id="x", device=bs.device())
    await expect_error(device.ReportAccountUse(malformed), grpc.StatusCode.INVALID_ARGUMENT)

    after = await scrape(server)
    for code in ("UNAUTHENTICATED", "INVALID_ARGUMENT"):
        labels = rpc("ReportAccountUse", code)
        assert value(after, "grpc_server_handled_total", **labels) == (
            value(before, "grpc_server_handled_total", **labels) + 1
        ), code
    # Refused before any work: no outcome counted.
    assert sum(
        value(after, "tether_binding_reports_total", outcome=o) for o in ("bound", "not_eligible")
    ) == sum(
        value(before, "tether_binding_reports_total", outcome=o) for o in ("bound", "not_eligible")
    )


async def test_guard_verdicts_count_by_action_verdict_and_reason(server: RunningServer) -> None:
    guard = await guard_client(server)
    service = await new_service(guard, register_limit=1)
    browser = fingerprint("metrics")
    before = await scrape(server)

    await guard.evaluate(service, "register", account("first"), browser, "198.51.100.9")
    await guard.evaluate(service, "register", account("second"), browser, "198.51.100.9")

    after = await scrape(server)
    allowed = {"action": "register", "verdict": "allow", "reason": "within_limit"}
    denied = {"action": "register", "verdict": "deny", "reason": "register_limit"}
    for labels in (allowed, denied):
        assert value(after, "tether_guard_verdicts_total", **labels) == (
            value(before, "tether_guard_verdicts_total", **labels) + 1
        ), labels
    evaluate = rpc("Evaluate", "OK", service="tether.guard.v1.FingerprintGuard")
    assert value(after, "grpc_server_handled_total", **evaluate) == (
        value(before, "grpc_server_handled_total", **evaluate) + 2
    )
    assert value(after, "tether_redis_call_seconds_count", operation="guard.evaluate") == (
        value(before, "tether_redis_call_seconds_count", operation="guard.evaluate") + 2
    )
    # The registration is recorded in SQL before it is answered.
    assert value(after, "tether_guard_record_batch_size_count") > value(
        before, "tether_guard_record_batch_size_count"
    )


async def test_instructions_by_state_follow_delivery_to_a_connected_partner(
    server: RunningServer,
) -> None:
    partner_id, partner_token = await server.partner(services=("free-data",))
    device_token = await server.credential("device")
    await ps.bind(server, device_token, partner_token)

    waiting = await scrape(server)
    assert (
        value(waiting, "tether_provisioning_instructions", partner_id=partner_id, state="pending")
        == 1
    )
    assert (
        value(waiting, "tether_provisioning_oldest_undelivered_seconds", partner_id=partner_id) >= 0
    )
    assert (
        "tether_provisioning_oldest_undelivered_seconds",
        frozenset({("partner_id", partner_id)}),
    ) in waiting

    partner = ps.RecordingPartner()
    async with ps.running_worker(server.channel(partner_token), partner):
        connected = await scrape(server)
        assert value(connected, "tether_provisioning_partner_streams", partner_id=partner_id) == 1

        async def confirmed() -> bool:
            samples = await scrape(server)
            return (
                value(
                    samples,
                    "tether_provisioning_instructions",
                    partner_id=partner_id,
                    state="confirmed",
                )
                == 1
            )

        await ps.eventually(confirmed, what="the instruction confirmed")
    done = await scrape(server)
    assert (
        value(done, "tether_provisioning_instructions", partner_id=partner_id, state="pending") == 0
    )
    assert (
        "tether_provisioning_oldest_undelivered_seconds",
        frozenset({("partner_id", partner_id)}),
    ) not in done

    async def disconnected() -> bool:
        samples = await scrape(server)
        return value(samples, "tether_provisioning_partner_streams", partner_id=partner_id) == 0

    await ps.eventually(disconnected, what="the partner stream closed")


async def test_an_unconfirmed_instruction_counts_a_redelivery_then_its_death(
    postgres_url: str, redis_url: str, tmp_path: Path
) -> None:
    running = await start_server(
        database_url=postgres_url,
        redis_url=redis_url,
        data_dir=tmp_path,
        metrics_listen="127.0.0.1:0",
        database_pool_size=2,
        provisioning_ack_deadline_seconds=0.05,
        provisioning_max_attempts=2,
    )
    try:
        _, partner_token = await running.partner(services=("free-data",))
        await ps.bind(running, await running.credential("device"), partner_token)
        partner = ps.stub(running, partner_token)
        before = await scrape(running)
        attempts: list[int] = []

        dead = "tether_provisioning_dead_instructions_total"

        async def fetched_until_dead() -> bool:
            response = await partner.FetchInstructions(
                provisioning_pb.FetchInstructionsRequest(request_id=secrets.token_hex(8))
            )
            attempts.extend(i.attempt for i in response.instructions)
            # Leased twice, never confirmed: the lease after the second
            # expires parks it as dead.
            return value(await scrape(running), dead) > value(before, dead)

        await ps.eventually(fetched_until_dead, what="two deliveries, then a dead instruction")
        after = await scrape(running)
    finally:
        await running.stop()
    assert attempts == [1, 2]
    for name in (
        "tether_provisioning_redeliveries_total",
        "tether_provisioning_dead_instructions_total",
    ):
        assert value(after, name) == value(before, name) + 1, name


async def test_redis_going_away_counts_the_fail_modes_and_the_final_unavailable(
    postgres_url: str, tmp_path: Path
) -> None:
    async with private_redis(tmp_path) as redis_server:
        running = await start_server(
            database_url=postgres_url,
            redis_url=redis_server.url,
            data_dir=tmp_path / "data",
            redis_timeout_seconds=0.25,
            metrics_listen="127.0.0.1:0",
            database_pool_size=2,
        )
        try:
            guard = await guard_client(running)
            opened = await new_service(guard, redis_failure=guard_pb.REDIS_FAILURE_FAIL_OPEN)
            closed = await new_service(guard, redis_failure=guard_pb.REDIS_FAILURE_FAIL_CLOSED)
            devices = bs.stub(running, await running.credential("device"))
            before = await scrape(running)
            await redis_server.stop()

            browser = fingerprint("outage")
            verdict = await guard.evaluate(opened, "login", account("a"), browser, "198.51.100.3")
            assert verdict.fail_open
            await expect_error(
                guard.evaluate(closed, "login", account("b"), browser, "198.51.100.3"),
                grpc.StatusCode.UNAVAILABLE,
            )
            # The report's rate limit lets the report through.
            await devices.ReportAccountUse(bs.report_request(bs.device(), bs.phone_account()))

            after = await scrape(running)
        finally:
            await running.stop()
    for component, mode in (("guard", "open"), ("guard", "closed"), ("binding_rate_limit", "open")):
        labels = {"component": component, "mode": mode}
        assert value(after, "tether_fail_mode_total", **labels) == (
            value(before, "tether_fail_mode_total", **labels) + 1
        ), labels
    unavailable = rpc("Evaluate", "UNAVAILABLE", service="tether.guard.v1.FingerprintGuard")
    assert value(after, "grpc_server_handled_total", **unavailable) == (
        value(before, "grpc_server_handled_total", **unavailable) + 1
    )
    failed_open = {"action": "login", "verdict": "allow", "reason": "counters_unavailable"}
    assert value(after, "tether_guard_verdicts_total", **failed_open) == (
        value(before, "tether_guard_verdicts_total", **failed_open) + 1
    )


class SeenMethods(grpc.aio.ServerInterceptor):
    """Stock instrumentation's shape: an interceptor of the embedding code."""

    def __init__(self) -> None:
        self.methods: list[str] = []

    async def intercept_service(self, continuation: Any, details: Any) -> Any:
        self.methods.append(details.method)
        return await continuation(details)


async def test_interceptors_of_the_embedding_code_see_every_call_before_authentication(
    postgres_url: str, redis_url: str, tmp_path: Path
) -> None:
    seen = SeenMethods()
    running = await start_server(
        database_url=postgres_url,
        redis_url=redis_url,
        data_dir=tmp_path,
        interceptors=[seen],
        database_pool_size=2,
    )
    try:
        assert running.app.metrics is None
        stranger = bs.stub(running, "not-a-token")
        await expect_error(
            stranger.ReportAccountUse(bs.report_request(bs.device(), bs.phone_account())),
            grpc.StatusCode.UNAUTHENTICATED,
        )
        await running.admin().ListPartners(admin_pb.ListPartnersRequest())
    finally:
        await running.stop()
    assert seen.methods[-2:] == [
        f"/{BINDING}/ReportAccountUse",
        "/tether.admin.v1.Admin/ListPartners",
    ]


# --- several worker processes ----------------------------------------------------


def _worker(
    index: int, metrics_dir: Path, metrics_port: int, database_url: str, redis_url: str, keys: str
) -> ServerProcess:
    """A server process set up as a supervisor's worker `index` would be."""
    return ServerProcess(
        database_url=database_url,
        redis_url=redis_url,
        digest_keys=keys,
        data_dir=metrics_dir / f"worker-{index}",
        env={
            "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir),
            "TETHER_WORKER_INDEX": str(index),
            # Both are told the same port: only worker 0 may bind it.
            "TETHER_METRICS_LISTEN": f"127.0.0.1:{metrics_port}",
            "TETHER_DATABASE_POOL_SIZE": "2",
            "TETHER_HTTP_LISTEN": "",
        },
    )


async def test_two_workers_write_one_directory_and_worker_0_serves_their_sum(
    postgres_url: str, redis_url: str, tmp_path: Path
) -> None:
    await migrate.upgrade_async(postgres_url)
    metrics_port = free_port()
    keys = digests.new_key_spec("workers")
    workers = [_worker(i, tmp_path, metrics_port, postgres_url, redis_url, keys) for i in range(2)]
    try:
        for worker in workers:
            await worker.start()
        unauthenticated = rpc("ReportAccountUse", "UNAUTHENTICATED")
        url = f"http://127.0.0.1:{metrics_port}/metrics"
        before = value(await scrape_url(url), "grpc_server_handled_total", **unauthenticated)
        for worker, calls in zip(workers, (3, 2), strict=True):
            channel = open_channel(worker.address, "not-a-token")
            stub = binding_grpc.BindingStub(channel)
            for _ in range(calls):
                await expect_error(
                    stub.ReportAccountUse(bs.report_request(bs.device(), bs.phone_account())),
                    grpc.StatusCode.UNAUTHENTICATED,
                )
            await channel.close()

        # Each worker moves its counts into the shared files at least every
        # FLUSH_SECONDS (worker 0 also at the scrape): wait for worker 1's.
        deadline = time.monotonic() + 10 * fast.FLUSH_SECONDS
        while True:
            total = value(await scrape_url(url), "grpc_server_handled_total", **unauthenticated)
            if total >= before + 5 or time.monotonic() > deadline:
                break
            await asyncio.sleep(fast.FLUSH_SECONDS / 4)
        assert total == before + 5
        # Both workers are alive: neither failed on the metrics port.
        assert all(w.process is not None and w.process.poll() is None for w in workers)
    finally:
        for worker in workers:
            worker.stop()
