"""Helpers of the guard's tests: fingerprints, a client, fresh services,
and a private redis-server a test may stop and flush."""

from __future__ import annotations

import asyncio
import secrets
import shutil
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis.asyncio as redis

from tests.support import RunningServer, free_port
from tether.clients.guard.client import GuardClient, account, components
from tether.guard.v1 import messages_pb2 as pb
from tether.server.guard.restorer import Restorer
from tether.server.guard.service import Guard
from tether.server.guard.web import WebSide


def fingerprint(seed: str = "a", **changes: Any) -> pb.FingerprintComponents:
    """A plausible desktop Chrome fingerprint; each seed is another browser."""
    fields: dict[str, Any] = {
        "browser_name": "Chrome",
        "browser_version": "131.0.6778.85",
        "os_name": "Linux",
        "screen_width": 1920,
        "screen_height": 1080,
        "pixel_ratio": 1.0,
        "color_depth": 24,
        "fonts": ["DejaVu Sans", "Liberation Serif", f"Font {seed}"],
        "plugins": ["PDF Viewer: Portable Document Format"],
        "languages": ["en-US", "en"],
        "timezone": "Europe/Berlin",
        "platform": "Linux x86_64",
        "extra": {"canvas": f"c-{seed}"},
    }
    fields.update(changes)
    return components(fields)


def timed_event(
    when: float, name: str, components: pb.FingerprintComponents, ip: str
) -> pb.BacktestEvent:
    """A registration in a backtest, at `when`."""
    event = pb.BacktestEvent(
        request=pb.EvaluateRequest(
            action=pb.ACTION_REGISTER, account=account(name), components=components, client_ip=ip
        )
    )
    event.event_time.FromNanoseconds(int(when * 1e9))
    return event


async def replay_verdicts(
    guard: GuardClient, limit: int, events: list[pb.BacktestEvent]
) -> list[pb.EvaluateResponse]:
    """Verdicts of a backtest: event times are its clock, for the book and
    the counting script alike."""
    start = pb.BacktestStart(
        policy=pb.Policy(service_id="timeline", register_limit=limit), verdicts=True
    )
    verdicts = [
        r.verdict.response async for r in guard.backtest(start, events) if r.HasField("verdict")
    ]
    assert len(verdicts) == len(events)
    return verdicts


async def guard_client(server: RunningServer, kind: str = "internal") -> GuardClient:
    return GuardClient(server.channel(await server.credential(kind)))


async def race_of_registrations(
    server: RunningServer, ip: str, racers: int = 1000, limit: int = 7
) -> None:
    """`racers` simultaneous registrations from one browser admit exactly
    the limit, each with its own count, and none by failing open."""
    guard = await guard_client(server)
    service = await new_service(guard, register_limit=limit)
    browser = fingerprint("race")
    verdicts = await asyncio.gather(
        *(
            guard.evaluate(service, "register", account(f"racer{i}"), browser, ip)
            for i in range(racers)
        )
    )
    allowed = [v for v in verdicts if v.verdict == pb.VERDICT_ALLOW]
    assert len(allowed) == limit
    assert all(v.reason == pb.VERDICT_REASON_WITHIN_LIMIT for v in allowed)
    assert not any(v.fail_open for v in verdicts)
    assert sorted(v.count for v in allowed) == list(range(1, limit + 1))
    denied = [v for v in verdicts if v.verdict == pb.VERDICT_DENY]
    assert len(denied) == racers - limit


async def new_service(client: GuardClient, **fields: Any) -> str:
    """A service of its own, so tests never share counters."""
    service_id = f"svc-{secrets.token_hex(5)}"
    await client.set_policy(pb.Policy(service_id=service_id, **fields))
    return service_id


def guard_of(server: RunningServer) -> Guard:
    """The server's guard domain object (to flush its written-behind record)."""
    return server.app.areas.guard.guard


def restorer_of(server: RunningServer) -> Restorer:
    """The server's restorer of lost counters (to await its restores)."""
    return server.app.areas.guard.restorer


def web_of(server: RunningServer) -> WebSide:
    """The server's web side (for its URL)."""
    return server.app.areas.guard.web


@dataclass
class PrivateRedis:
    """A redis-server of the test's own, which it may stop and flush."""

    port: int
    workdir: Path
    process: subprocess.Popen[bytes] | None = None
    password: str = ""
    db: int = 0

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/{self.db}"

    async def start(self) -> None:
        binary = shutil.which("redis-server")
        assert binary, "redis-server must be installed"
        self.process = subprocess.Popen(  # noqa: ASYNC220 - a daemon we keep running
            [
                binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.workdir),
                *(["--requirepass", self.password] if self.password else []),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        client = redis.Redis.from_url(self.url)
        try:
            for _ in range(200):
                try:
                    if await client.ping():
                        return
                except (redis.ConnectionError, OSError):
                    await asyncio.sleep(0.025)
        finally:
            await client.aclose()
        raise RuntimeError("private redis-server did not start")

    async def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            await asyncio.to_thread(self.process.wait, 10)
            self.process = None

    async def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.url)


@asynccontextmanager
async def private_redis(
    workdir: Path, password: str = "", db: int = 0
) -> AsyncIterator[PrivateRedis]:
    server = PrivateRedis(free_port(), workdir, password=password, db=db)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()
