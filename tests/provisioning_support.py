"""Helpers of the provisioning tests: bindings through the real Binding
service, a running partner worker, server processes, database checks."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from sqlalchemy import func, select

from tests import binding_support as bs
from tests.support import RunningServer, free_port
from tether.binding.v1 import messages_pb2 as binding_pb
from tether.clients.partner.provisioning import (
    Done,
    Instruction,
    PartnerWorker,
    Result,
    Usage,
    UsageQuery,
)
from tether.common.v1 import types_pb2 as types
from tether.provisioning.v1 import messages_pb2 as pb
from tether.provisioning.v1 import service_pb2_grpc
from tether.server.binding.tables import Binding
from tether.server.provisioning.tables import ACTIVE, EntitlementEvent
from tether.server.provisioning.tables import Instruction as Row
from tether.server.storage.database import Database

ROOT = Path(__file__).resolve().parent.parent


def stub(server: RunningServer, token: str) -> service_pb2_grpc.ProvisioningAsyncStub:
    return stub_at(server.channel(token))


def stub_at(channel: grpc.aio.Channel) -> service_pb2_grpc.ProvisioningAsyncStub:
    return service_pb2_grpc.ProvisioningStub(channel)


@dataclass
class Bound:
    binding: binding_pb.AccountBinding
    account: types.Account
    device: types.Device


async def bind(
    server: RunningServer,
    device_token: str,
    partner_token: str,
    *,
    account: types.Account | None = None,
    device: types.Device | None = None,
) -> Bound:
    """Puts an account on the partner's list and reports it from a device."""
    account = account or bs.phone_account()
    device = device or bs.device()
    await bs.add_accounts(server, partner_token, [account], reference="ref-" + account.value)
    response = await bs.stub(server, device_token).ReportAccountUse(
        bs.report_request(device, account)
    )
    (outcome,) = response.outcomes
    assert outcome.outcome == binding_pb.REPORT_OUTCOME_BOUND
    return Bound(outcome.binding, account, device)


async def eventually(
    check: Callable[[], Awaitable[bool]], *, within: float = 20.0, what: str = ""
) -> None:
    """Polls check() until it holds; for states nothing can be awaited on."""
    deadline = time.monotonic() + within
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not reached within {within}s: {what}")
        await asyncio.sleep(0.05)


@dataclass
class RecordingPartner:
    """Handlers that remember every call, as a partner's backend would."""

    delay: float = 0.0
    opened: Counter[str] = field(default_factory=Counter)
    closed: Counter[str] = field(default_factory=Counter)
    usage_queries: list[UsageQuery] = field(default_factory=list)
    figures: dict[str, int] = field(default_factory=lambda: {"data_mb": 42})
    arrived: asyncio.Event = field(default_factory=asyncio.Event)
    # Usage queries never get an answer (a partner backend that hangs);
    # usage_asked is set when one arrives.
    hangs_on_usage: bool = False
    usage_asked: asyncio.Event = field(default_factory=asyncio.Event)

    async def on_open(self, instruction: Instruction) -> Result:
        self.arrived.set()
        if self.delay:
            await asyncio.sleep(self.delay)
        self.opened[instruction.instruction_id] += 1
        return Done("sub-" + instruction.instruction_id[:8])

    async def on_close(self, instruction: Instruction) -> Result:
        self.closed[instruction.instruction_id] += 1
        return Done()

    async def on_usage(self, query: UsageQuery) -> Usage:
        self.usage_queries.append(query)
        self.usage_asked.set()
        if self.hangs_on_usage:
            await asyncio.Event().wait()
        return Usage(dict(self.figures), period="this month")


@contextlib.asynccontextmanager
async def running_worker(
    channel: grpc.aio.Channel, partner: RecordingPartner, **options: Any
) -> AsyncIterator[PartnerWorker]:
    worker = PartnerWorker(
        channel,
        on_open=partner.on_open,
        on_close=partner.on_close,
        on_usage_query=partner.on_usage,
        backoff_initial=0.05,
        backoff_max=0.5,
        **options,
    )
    task = asyncio.create_task(worker.run())
    try:
        await asyncio.wait_for(worker.connected.wait(), 20)
        yield worker
    finally:
        worker.stop()
        await asyncio.wait_for(task, 10)


async def pipeline_counts(
    channel: grpc.aio.Channel, partner_id: str
) -> dict[pb.InstructionState.ValueType, int]:
    response = await service_pb2_grpc.ProvisioningStub(channel).GetPipeline(
        pb.GetPipelineRequest(partner_id=partner_id)
    )
    return {s.state: s.count for s in response.stages}


# --- database checks (read only) ------------------------------------------


async def instructions_of(db: Database, partner_id: str) -> list[Row]:
    async with db.sessions() as session:
        return list(
            await session.scalars(select(Row).where(Row.partner_id == partner_id).order_by(Row.seq))
        )


async def bindings_of(db: Database, partner_id: str) -> list[Binding]:
    async with db.sessions() as session:
        return list(await session.scalars(select(Binding).where(Binding.partner_id == partner_id)))


async def activations_per_binding(db: Database, partner_id: str) -> Counter[str]:
    """How many times each binding's entitlement became active."""
    async with db.sessions() as session:
        rows = await session.execute(
            select(EntitlementEvent.binding_id, func.count())
            .where(EntitlementEvent.partner_id == partner_id, EntitlementEvent.state == ACTIVE)
            .group_by(EntitlementEvent.binding_id)
        )
        return Counter({str(b): int(n) for b, n in rows})


# --- server processes -------------------------------------------------------


@dataclass
class ServerProcess:
    """`python -m tether.server` in a subprocess, as production runs it."""

    database_url: str
    redis_url: str
    digest_keys: str
    data_dir: Path
    port: int = field(default_factory=free_port)
    env: dict[str, str] = field(default_factory=dict)
    process: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def start(self) -> None:
        env = {
            **os.environ,
            "TETHER_DATABASE_URL": self.database_url,
            "TETHER_REDIS_URL": self.redis_url,
            "TETHER_DIGEST_KEYS": self.digest_keys,
            "TETHER_LISTEN": self.address,
            "TETHER_DATA_DIR": str(self.data_dir),
            "TETHER_CREDENTIAL_CACHE_SECONDS": "0",
            "TETHER_LOG_FORMAT": "json",
            "TETHER_LOG_LEVEL": "WARNING",
            **self.env,
        }
        self.data_dir.mkdir(parents=True, exist_ok=True)
        with (self.data_dir / f"server-{self.port}.log").open("ab") as log:
            self.process = subprocess.Popen(  # noqa: ASYNC220 (started once, awaited via health)
                [sys.executable, "-m", "tether.server"],
                env=env,
                cwd=ROOT,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        await self.wait_serving()

    async def wait_serving(self, within: float = 30.0) -> None:
        """Waits for the standard gRPC health check to answer SERVING."""
        deadline = time.monotonic() + within
        async with grpc.aio.insecure_channel(self.address) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            while True:
                assert self.process is not None
                if self.process.poll() is not None:
                    raise AssertionError(f"server exited with {self.process.returncode}")
                try:
                    response = await health.Check(health_pb2.HealthCheckRequest(), timeout=1)
                    if response.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.aio.AioRpcError:
                    pass
                if time.monotonic() > deadline:
                    raise AssertionError(f"server on {self.address} not serving")
                await asyncio.sleep(0.05)

    def kill(self) -> None:
        """SIGKILL: no draining, no cleanup, as in a crash."""
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
