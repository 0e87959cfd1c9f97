"""Real server processes on one PostgreSQL: a crash with instructions in
flight, and two replicas sharing the work."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import grpc

from tests import binding_support as bs
from tests import provisioning_support as ps
from tests.support import RunningServer
from tether.binding.v1 import messages_pb2 as binding_pb
from tether.binding.v1 import service_pb2_grpc as binding_grpc
from tether.clients.connection import open_channel
from tether.clients.partner.provisioning import PartnerProvisioning
from tether.provisioning.v1 import messages_pb2 as pb

FAST = {
    "TETHER_PROVISIONING_ACK_DEADLINE_SECONDS": "1",
    "TETHER_PROVISIONING_POLL_SECONDS": "0.2",
}


@contextlib.asynccontextmanager
async def server_process(
    pg_server: RunningServer,
    postgres_url: str,
    redis_url: str,
    data_dir: Path,
    env: dict[str, str] | None = None,
) -> AsyncIterator[ps.ServerProcess]:
    process = ps.ServerProcess(
        database_url=postgres_url,
        redis_url=redis_url,
        digest_keys=pg_server.app.settings.digest_keys,
        data_dir=data_dir,
        env=FAST if env is None else env,
    )
    await process.start()
    try:
        yield process
    finally:
        process.stop()


async def _report_until_bound(
    address: str, device_token: str, requests: list[binding_pb.ReportAccountUseRequest]
) -> None:
    """Reports like a device does: on failure, the same request again (same id)."""
    async with open_channel(address, device_token) as channel:
        stub = binding_grpc.BindingStub(channel)
        for request in requests:
            while True:
                try:
                    response = await stub.ReportAccountUse(request, timeout=5)
                    assert response.outcomes[0].outcome == binding_pb.REPORT_OUTCOME_BOUND
                    break
                except grpc.aio.AioRpcError as error:
                    assert error.code() in (
                        grpc.StatusCode.UNAVAILABLE,
                        grpc.StatusCode.DEADLINE_EXCEEDED,
                        grpc.StatusCode.CANCELLED,
                    ), error
                    await asyncio.sleep(0.05)


async def _listed(
    server: RunningServer, partner_token: str, n: int
) -> list[binding_pb.ReportAccountUseRequest]:
    accounts = [bs.phone_account() for _ in range(n)]
    await bs.add_accounts(server, partner_token, accounts, reference="r")
    return [bs.report_request(bs.device(), account) for account in accounts]


async def _all_confirmed(server: RunningServer, partner_id: str, expected: int) -> bool:
    rows = await ps.instructions_of(server.app.runtime.db, partner_id)
    return len(rows) == expected and all(r.state == "confirmed" for r in rows)


async def _check_exactly_once(
    server: RunningServer, partner_id: str, partners: list[ps.RecordingPartner], n: int
) -> None:
    db = server.app.runtime.db
    bindings = await ps.bindings_of(db, partner_id)
    rows = await ps.instructions_of(db, partner_id)
    assert len(bindings) == n
    # No binding without its instruction, no instruction without its binding.
    assert sorted(str(b.binding_id) for b in bindings) == sorted(str(r.binding_id) for r in rows)
    assert {r.state for r in rows} == {"confirmed"}
    # Nothing lost: the partner saw every instruction (some maybe twice).
    seen = set().union(*(set(p.opened) for p in partners))
    assert seen == {str(r.instruction_id) for r in rows}
    # Effect once: every entitlement became active exactly once.
    activations = await ps.activations_per_binding(db, partner_id)
    assert len(activations) == n and set(activations.values()) == {1}


async def test_server_killed_with_instructions_in_flight_loses_and_repeats_nothing(
    pg_server: RunningServer, postgres_url: str, redis_url: str, tmp_path: Path
) -> None:
    partner_id, partner_token = await pg_server.partner()
    device_token = await pg_server.credential("device")
    requests = await _listed(pg_server, partner_token, 40)
    partner = ps.RecordingPartner(delay=0.05)

    async with server_process(pg_server, postgres_url, redis_url, tmp_path) as process:
        channel = open_channel(process.address, partner_token)
        try:
            async with ps.running_worker(channel, partner, max_in_flight=8) as worker:
                reporting = [
                    asyncio.create_task(
                        _report_until_bound(process.address, device_token, requests[i::4])
                    )
                    for i in range(4)
                ]

                async def some_opened() -> bool:
                    return len(partner.opened) >= 5

                await ps.eventually(some_opened, what="first instructions handled")
                process.kill()
                await process.start()  # same port: the partner reconnects by itself
                await asyncio.wait_for(asyncio.gather(*reporting), 60)

                async def done() -> bool:
                    return await _all_confirmed(pg_server, partner_id, 40)

                await ps.eventually(done, within=60, what="all 40 confirmed after restart")
                assert worker.stats.streams_opened >= 2
        finally:
            await channel.close()
    await _check_exactly_once(pg_server, partner_id, [partner], 40)


async def test_two_server_processes_and_two_streams_confirm_each_instruction_once(
    pg_server: RunningServer, postgres_url: str, redis_url: str, tmp_path: Path
) -> None:
    partner_id, partner_token = await pg_server.partner()
    device_token = await pg_server.credential("device")
    requests = await _listed(pg_server, partner_token, 60)
    partners = [ps.RecordingPartner(), ps.RecordingPartner()]

    async with (
        server_process(pg_server, postgres_url, redis_url, tmp_path / "a") as a,
        server_process(pg_server, postgres_url, redis_url, tmp_path / "b") as b,
    ):
        channels = [open_channel(p.address, partner_token) for p in (a, b)]
        try:
            async with (
                ps.running_worker(channels[0], partners[0], max_in_flight=4),
                ps.running_worker(channels[1], partners[1], max_in_flight=4),
            ):
                # Bindings arrive through both replicas.
                await asyncio.gather(
                    _report_until_bound(a.address, device_token, requests[0::2]),
                    _report_until_bound(b.address, device_token, requests[1::2]),
                )

                async def done() -> bool:
                    return await _all_confirmed(pg_server, partner_id, 60)

                await ps.eventually(done, within=60, what="all 60 confirmed")
        finally:
            for channel in channels:
                await channel.close()
    # Leases never overlapped: no instruction went to both streams.
    assert not set(partners[0].opened) & set(partners[1].opened)
    assert max(n for p in partners for n in p.opened.values()) == 1
    await _check_exactly_once(pg_server, partner_id, partners, 60)


async def test_server_stopped_with_sigterm_hands_its_leases_back_at_once(
    pg_server: RunningServer, postgres_url: str, redis_url: str, tmp_path: Path
) -> None:
    _, partner_token = await pg_server.partner()
    device_token = await pg_server.credential("device")
    requests = await _listed(pg_server, partner_token, 5)
    await _report_until_bound(pg_server.address, device_token, requests)
    held: list[str] = []
    # The default ack deadline (30 s): only a release can bring them back in time.
    async with server_process(pg_server, postgres_url, redis_url, tmp_path, env={}) as process:
        channel = open_channel(process.address, partner_token)
        stream = ps.stub_at(channel).Connect(_hello_then_nothing())
        try:
            while len(held) < 5:
                response = await asyncio.wait_for(stream.read(), 20)
                assert isinstance(response, pb.ConnectResponse)
                if response.WhichOneof("message") == "instruction":
                    held.append(response.instruction.instruction_id)
                elif response.WhichOneof("message") == "instructions":
                    held.extend(i.instruction_id for i in response.instructions.instructions)
            process.stop()  # SIGTERM, then wait for the exit
        finally:
            stream.cancel()
            await channel.close()
    fetched = await PartnerProvisioning(pg_server.channel(partner_token)).fetch(10)
    assert sorted(i.instruction_id for i in fetched) == sorted(held)
    assert {i.attempt for i in fetched} == {2}


async def _hello_then_nothing() -> AsyncIterator[pb.ConnectRequest]:
    yield pb.ConnectRequest(hello=pb.StreamHello())
    await asyncio.Event().wait()
