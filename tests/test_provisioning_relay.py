"""Live usage queries across real server processes on one PostgreSQL: a
device asks one process, the partner's only stream is on another."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import grpc

from tests import provisioning_support as ps
from tests.support import RunningServer
from tests.test_provisioning_processes import server_process
from tether.clients.connection import open_channel
from tether.clients.device.provisioning import DeviceProvisioning
from tether.provisioning.v1 import messages_pb2 as pb

NOT_CONNECTED = pb.USAGE_ANSWER_SOURCE_LAST_KNOWN_PARTNER_NOT_CONNECTED


def _figures(response: pb.QueryDeviceUsageResponse) -> dict[str, int]:
    return {f.metric: f.quantity for f in response.figures}


async def _streams_on(address: str, token: str, partner_id: str) -> int:
    async with open_channel(address, token) as channel:
        response = await ps.stub_at(channel).GetPipeline(
            pb.GetPipelineRequest(partner_id=partner_id)
        )
    return response.connected_streams[partner_id]


@asynccontextmanager
async def _device_on_a_partner_on_b(
    pg_server: RunningServer,
    postgres_url: str,
    redis_url: str,
    tmp_path: Path,
    device_token: str,
    partner_token: str,
) -> AsyncIterator[tuple[ps.ServerProcess, ps.ServerProcess, DeviceProvisioning, grpc.aio.Channel]]:
    """Two server processes, a and b: the device talks to a, the partner to b."""
    async with (
        server_process(pg_server, postgres_url, redis_url, tmp_path / "a", env={}) as a,
        server_process(pg_server, postgres_url, redis_url, tmp_path / "b", env={}) as b,
        open_channel(a.address, device_token) as device_channel,
        open_channel(b.address, partner_token) as partner_channel,
    ):
        yield a, b, DeviceProvisioning(device_channel), partner_channel


async def test_device_asking_one_process_gets_the_answer_of_a_stream_on_another(
    pg_server: RunningServer, postgres_url: str, redis_url: str, tmp_path: Path
) -> None:
    partner_id, partner_token = await pg_server.partner(services=("free-data",))
    _, lonely_token = await pg_server.partner(services=("free-data",))
    device_token = await pg_server.credential("device")
    internal_token = await pg_server.credential("internal")
    bound = await ps.bind(pg_server, device_token, partner_token)
    lonely = await ps.bind(pg_server, device_token, lonely_token)
    partner = ps.RecordingPartner(figures={"data_mb": 640, "sessions": 7})

    async with _device_on_a_partner_on_b(
        pg_server, postgres_url, redis_url, tmp_path, device_token, partner_token
    ) as (a, b, devices, partner_channel):
        async with ps.running_worker(partner_channel, partner):
            assert await _streams_on(a.address, internal_token, partner_id) == 0
            live = await devices.usage(
                bound.device, bound.binding.binding_id, "free-data", timeout=10
            )
            assert live.source == pb.USAGE_ANSWER_SOURCE_PARTNER
            assert _figures(live) == {"data_mb": 640, "sessions": 7}
            assert live.period == "this month"
            (query,) = partner.usage_queries
            assert query.partner_reference == bound.binding.partner_reference
            assert query.binding_id == bound.binding.binding_id

            # An answer that would not fit in one NOTIFY comes back as an error.
            partner.figures = {f"metric_{i:03d}_{'x' * 50}": i for i in range(200)}
            huge = await devices.usage(
                bound.device, bound.binding.binding_id, "free-data", timeout=10
            )
            assert huge.source == pb.USAGE_ANSWER_SOURCE_LAST_KNOWN_PARTNER_NO_ANSWER
            assert "too large to relay" in huge.partner_error
            assert _figures(huge) == {"data_mb": 640, "sessions": 7}

            # Another partner's question never reaches this partner's stream.
            other = await devices.usage(
                lonely.device, lonely.binding.binding_id, "free-data", timeout=10
            )
            assert other.source == NOT_CONNECTED
            assert _figures(other) == {}
            assert len(partner.usage_queries) == 2

        async def gone_from_b() -> bool:
            return await _streams_on(b.address, internal_token, partner_id) == 0

        await ps.eventually(gone_from_b, what="the stream on b closed")
        # Connected nowhere: the clear status and the last live figures.
        for address in (a.address, b.address):
            async with open_channel(address, device_token) as channel:
                known = await DeviceProvisioning(channel).usage(
                    bound.device, bound.binding.binding_id, "free-data", timeout=10
                )
            assert known.source == NOT_CONNECTED
            assert _figures(known) == {"data_mb": 640, "sessions": 7}
            assert known.period == "this month"
    assert len(partner.usage_queries) == 2


async def test_holder_process_dying_mid_query_costs_only_that_query(
    pg_server: RunningServer, postgres_url: str, redis_url: str, tmp_path: Path
) -> None:
    _, partner_token = await pg_server.partner(services=("free-data",))
    device_token = await pg_server.credential("device")
    bound = await ps.bind(pg_server, device_token, partner_token)
    partner = ps.RecordingPartner(hangs_on_usage=True)
    async with (
        _device_on_a_partner_on_b(
            pg_server, postgres_url, redis_url, tmp_path, device_token, partner_token
        ) as (_, b, devices, partner_channel),
        ps.running_worker(partner_channel, partner),
    ):
        asking = asyncio.create_task(
            devices.usage(bound.device, bound.binding.binding_id, "free-data", timeout=4)
        )
        await asyncio.wait_for(partner.usage_asked.wait(), 10)
        b.kill()
        # The caller's deadline ends the wait: last known figures.
        response = await asking
        assert response.source == pb.USAGE_ANSWER_SOURCE_LAST_KNOWN_PARTNER_NO_ANSWER

        async def not_connected() -> bool:
            again = await devices.usage(
                bound.device, bound.binding.binding_id, "free-data", timeout=4
            )
            return again.source == NOT_CONNECTED

        # b's presence went with its connection; a itself serves on.
        await ps.eventually(not_connected, what="b no longer present")
