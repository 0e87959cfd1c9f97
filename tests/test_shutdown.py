"""SIGTERM: the server stops taking calls and lets in-flight calls finish."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests import provisioning_support as ps
from tests.support import RunningServer
from tether.binding.v1 import messages_pb2 as pb
from tether.binding.v1.service_pb2_grpc import BindingStub
from tether.clients.connection import open_channel
from tether.common.v1 import types_pb2 as types


def _batch(first: int, count: int) -> pb.ImportEligibleAccountsRequest:
    return pb.ImportEligibleAccountsRequest(
        batch=pb.ImportBatch(
            entries=[
                pb.EligibleAccountEntry(
                    account=types.Account(kind=types.ACCOUNT_KIND_MEMBER_ID, value=f"drain-{n}")
                )
                for n in range(first, first + count)
            ]
        )
    )


def _log(process: ps.ServerProcess) -> str:
    """The server's own log, for a failure message."""
    path = process.data_dir / f"server-{process.port}.log"
    return path.read_text()[-3000:] if path.exists() else "(no log)"


async def _not_serving(address: str) -> None:
    """Returns once health says NOT_SERVING or the port stops answering."""
    async with grpc.aio.insecure_channel(address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        try:
            async for reply in health.Watch(health_pb2.HealthCheckRequest()):
                if reply.status != health_pb2.HealthCheckResponse.SERVING:
                    return
        except grpc.aio.AioRpcError as exc:
            # A draining server may drop the watch's connection instead.
            if exc.code() != grpc.StatusCode.UNAVAILABLE:
                raise


async def test_sigterm_lets_an_in_flight_import_finish(
    pg_server: RunningServer, postgres_url: str, redis_url: str, tmp_path: Path
) -> None:
    _, partner_token = await pg_server.partner()
    process = ps.ServerProcess(
        database_url=postgres_url,
        redis_url=redis_url,
        digest_keys=pg_server.app.settings.digest_keys,
        data_dir=tmp_path,
    )
    await process.start()
    rest_may_go = asyncio.Event()

    async def upload() -> AsyncIterator[pb.ImportEligibleAccountsRequest]:
        yield pb.ImportEligibleAccountsRequest(header=pb.ImportHeader(mode=pb.IMPORT_MODE_APPEND))
        yield _batch(0, 100)
        await rest_may_go.wait()
        yield _batch(100, 100)

    try:
        async with open_channel(process.address, partner_token) as channel:
            call = BindingStub(channel).ImportEligibleAccounts(upload())
            await call.initial_metadata()  # the server is inside the call
            assert process.process is not None
            process.process.send_signal(signal.SIGTERM)
            await asyncio.wait_for(_not_serving(process.address), 60)
            rest_may_go.set()
            try:
                response = await call
            except grpc.aio.AioRpcError as exc:
                # Seen once in a loaded CI run (the connection reset): the
                # server's own log says why.
                raise AssertionError(f"{exc.code()}: {exc.details()}\n{_log(process)}") from exc
        assert response.imported_count == 200
        assert await asyncio.to_thread(process.process.wait, 60) == 0, _log(process)
    finally:
        process.stop()
