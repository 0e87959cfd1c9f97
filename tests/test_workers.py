"""`tether-server serve --workers N`: workers sharing one port, a drain on
SIGTERM, restarts, and no other server on the port."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.conftest import create_database, drop_database
from tests.support import RunningServer, free_port
from tether.server.storage import migrate
from tether.server.storage.database import Database

ROOT = Path(__file__).resolve().parents[1]


async def until(condition: Callable[[], Awaitable[bool]], what: str, within: float = 30.0) -> None:
    deadline = time.monotonic() + within
    while not await condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {within}s: {what}")
        await asyncio.sleep(0.05)


@dataclass
class Supervised:
    """`python -m tether.server serve ...` in a subprocess, logging JSON to a file."""

    env: dict[str, str]
    log_path: Path
    args: tuple[str, ...] = ("--workers", "2")
    port: int = field(default_factory=free_port)
    process: asyncio.subprocess.Process | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def start(self) -> None:
        log = self.log_path.open("ab")
        try:
            self.process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "tether.server",
                "serve",
                *self.args,
                env={**self.env, "TETHER_LISTEN": self.address},
                cwd=ROOT,
                stdout=log,
                stderr=asyncio.subprocess.STDOUT,
            )
        finally:
            log.close()

    def lines(self) -> list[dict[str, Any]]:
        found = []
        for line in self.log_path.read_text().splitlines():
            with contextlib.suppress(ValueError):
                found.append(json.loads(line))
        return found

    def events(self, event: str) -> list[dict[str, Any]]:
        return [line for line in self.lines() if line.get("event") == event]

    async def serving_workers(self, count: int) -> None:
        """Waits until `count` "listening" lines of workers were logged."""

        async def listening() -> bool:
            assert self.process is not None
            if self.process.returncode is not None:
                raise AssertionError(f"exited with {self.process.returncode}: {self.lines()}")
            return len(self.events("listening")) >= count

        await until(listening, f"{count} workers listening on {self.address}")

    async def stop(self) -> int:
        assert self.process is not None
        if self.process.returncode is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return await asyncio.wait_for(self.process.wait(), 30)
        except TimeoutError:
            self.process.kill()
            await self.process.wait()
            raise


@pytest.fixture
def server_env(pg_server: RunningServer, postgres_url: str, redis_url: str) -> dict[str, str]:
    return {
        **os.environ,
        "TETHER_DATABASE_URL": postgres_url,
        "TETHER_REDIS_URL": redis_url,
        "TETHER_DIGEST_KEYS": pg_server.app.settings.digest_keys,
        "TETHER_HTTP_LISTEN": "127.0.0.1:0",
        "TETHER_DATABASE_POOL_SIZE": "2",
        "TETHER_LOG_FORMAT": "json",
        "TETHER_LOG_LEVEL": "INFO",
        "TETHER_SHUTDOWN_GRACE_SECONDS": "2",
    }


@contextlib.asynccontextmanager
async def supervised(
    env: dict[str, str], tmp_path: Path, args: tuple[str, ...] = ("--workers", "2")
) -> AsyncIterator[Supervised]:
    server = Supervised(env, tmp_path / "server.log", args)
    await server.start()
    try:
        yield server
    finally:
        if server.process is not None and server.process.returncode is None:
            await server.stop()


def _environment(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes()
    pairs = (item.decode().split("=", 1) for item in raw.split(b"\0") if b"=" in item)
    return dict(pairs)


def _is_dir(path: str) -> bool:
    return Path(path).is_dir()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


async def test_two_workers_share_the_port_restart_when_killed_and_drain_on_sigterm(
    server_env: dict[str, str], tmp_path: Path
) -> None:
    async with supervised(server_env, tmp_path) as server:
        await server.serving_workers(2)
        started = {line["worker"]: line["pid"] for line in server.events("worker started")}
        assert sorted(started) == [0, 1]
        # Each worker knows its index; both share one metrics directory.
        environments = [_environment(started[index]) for index in (0, 1)]
        assert [e["TETHER_WORKER_INDEX"] for e in environments] == ["0", "1"]
        metrics_dir = environments[0]["PROMETHEUS_MULTIPROC_DIR"]
        assert environments[1]["PROMETHEUS_MULTIPROC_DIR"] == metrics_dir
        assert _is_dir(metrics_dir)
        # Every worker logs its index on every line.
        assert {line["worker"] for line in server.events("listening")} == {0, 1}

        # Separate connections, spread by the kernel among the workers.
        channels = [
            grpc.aio.insecure_channel(
                server.address, options=[("grpc.use_local_subchannel_pool", 1)]
            )
            for _ in range(16)
        ]
        try:
            for channel in channels:
                response = await health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(), timeout=10
                )
                assert response.status == health_pb2.HealthCheckResponse.SERVING

            os.kill(started[0], signal.SIGKILL)

            # The connections worker 0 served close; worker 1's stay up.
            async def some_dropped() -> bool:
                return any(c.get_state() != grpc.ChannelConnectivity.READY for c in channels)

            await until(some_dropped, "a connection of the killed worker to close")
            kept = [c for c in channels if c.get_state() == grpc.ChannelConnectivity.READY]
            assert kept, "every connection was on the killed worker"
            for channel in kept:
                await health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(), timeout=10
                )
        finally:
            for channel in channels:
                await channel.close()

        async def restarted() -> bool:
            return (
                any(
                    line["worker"] == 0 and line["pid"] != started[0]
                    for line in server.events("worker started")
                )
                and len(server.events("listening")) >= 3
            )

        await until(restarted, "worker 0 restarted and listening")
        died = server.events("worker died; restarting")
        assert [(line["worker"], line["code"]) for line in died] == [(0, -signal.SIGKILL)]
        pids = [line["pid"] for line in server.events("worker started")]

        assert await server.stop() == 0
        assert [line["worker"] for line in server.events("stopped")].count(1) == 1
        assert not any(_pid_alive(pid) for pid in pids)
        assert not _is_dir(metrics_dir)


_TAKEN = re.compile(
    r"cannot listen on 127\.0\.0\.1:(\d+) for gRPC: another tether-server( \(pid \d+\))? "
    r"serves port \1; set TETHER_LISTEN"
)


@pytest.mark.parametrize(
    ("first", "second"),
    [
        (("--workers", "2"), ("--workers", "2")),
        (("--workers", "2"), ()),
        ((), ("--workers", "2")),
    ],
    ids=["workers-then-workers", "workers-then-single", "single-then-workers"],
)
async def test_a_second_server_on_the_port_fails_at_start_with_one_line(
    server_env: dict[str, str], tmp_path: Path, first: tuple[str, ...], second: tuple[str, ...]
) -> None:
    async with supervised(server_env, tmp_path, first) as server:
        await server.serving_workers(2 if first else 1)
        refused = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "tether.server",
            "serve",
            *second,
            env={**server_env, "TETHER_LISTEN": server.address},
            cwd=ROOT,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(refused.communicate(), 60)
        assert refused.returncode == 1
        assert out == b""
        lines = err.decode().splitlines()
        assert len(lines) == 1, lines
        match = _TAKEN.fullmatch(lines[0])
        assert match is not None, lines[0]
        assert int(match.group(1)) == server.port
        # The first server still serves.
        async with grpc.aio.insecure_channel(server.address) as channel:
            await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=10
            )
        assert await server.stop() == 0


async def test_workers_refuse_embedded_mode_in_one_line(tmp_path: Path) -> None:
    env = {
        **os.environ,
        "TETHER_DATA_DIR": str(tmp_path / "data"),
        "TETHER_LISTEN": f"127.0.0.1:{free_port()}",
        "TETHER_HTTP_LISTEN": "127.0.0.1:0",
        "TETHER_WORKERS": "2",
    }
    env.pop("TETHER_DATABASE_URL", None)
    env.pop("TETHER_REDIS_URL", None)
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tether.server",
        "serve",
        env=env,
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 1
    assert out == b""
    assert err.decode().splitlines() == [
        "2 workers need TETHER_DATABASE_URL (PostgreSQL) and TETHER_REDIS_URL: embedded "
        "SQLite and the in-process fakeredis belong to one process; set TETHER_WORKERS=1 "
        "or both URLs"
    ]
    assert not (tmp_path / "data").exists()


async def test_a_worker_that_cannot_start_stops_the_server_with_its_reason(
    server_env: dict[str, str], tmp_path: Path
) -> None:
    # Worker 0 serves the guard's web side; its port is taken.
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        web = f"127.0.0.1:{taken.getsockname()[1]}"
        env = {**server_env, "TETHER_HTTP_LISTEN": web}
        async with supervised(env, tmp_path) as server:
            assert server.process is not None
            code = await asyncio.wait_for(server.process.wait(), 60)
    assert code == 1
    text = server.log_path.read_text()
    assert f"cannot listen on {web} for the guard's web side" in text
    assert text.splitlines()[-1] == (
        "tether-server: worker 0 could not start (exit code 1); its reason is above"
    )
    assert "worker died; restarting" not in text


async def test_workers_start_on_a_fresh_database_the_supervisor_migrated(
    server_env: dict[str, str], tmp_path: Path
) -> None:
    name, url = await create_database()
    try:
        env = {**server_env, "TETHER_DATABASE_URL": url, "TETHER_MIGRATE_ON_START": "true"}
        async with supervised(env, tmp_path) as server:
            await server.serving_workers(2)
            assert await server.stop() == 0
        db = Database(url, 1)
        try:
            assert await migrate.current_revision(db.engine) == migrate.head_revision()
        finally:
            await db.close()
    finally:
        await drop_database(name)


@pytest.mark.parametrize(
    ("args", "env", "line"),
    [
        (
            ("--workers", "0"),
            {},
            "tether-server serve: error: argument --workers: a whole number of 1 or more, not '0'",
        ),
        (
            (),
            {"TETHER_WORKERS": "0"},
            "tether-server: TETHER_WORKERS: Input should be greater than or equal to 1 (got '0')",
        ),
    ],
    ids=["flag", "variable"],
)
async def test_a_worker_count_below_one_is_one_line_and_exit_2(
    tmp_path: Path, args: tuple[str, ...], env: dict[str, str], line: str
) -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tether.server",
        "serve",
        *args,
        env={**os.environ, "TETHER_DATA_DIR": str(tmp_path / "data"), **env},
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 2
    assert out == b""
    assert err.decode().splitlines()[-1] == line
    assert not (tmp_path / "data").exists()


@contextlib.contextmanager
def _adopting_orphans() -> Iterator[bool]:
    """Makes this process the subreaper of its descendants: a worker whose
    supervisor died becomes this process's child, so the test reaps it and
    reads its exit code, whatever the machine's init does with orphans.
    Yields whether it could (a sandbox may refuse the prctl)."""
    libc = ctypes.CDLL(None, use_errno=True)
    adopted = libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    try:
        yield adopted
    finally:
        if adopted:
            libc.prctl(_PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0)


_PR_SET_CHILD_SUBREAPER = 36


async def test_workers_whose_supervisor_died_drain_and_exit(
    server_env: dict[str, str], tmp_path: Path
) -> None:
    with _adopting_orphans() as adopted:
        async with supervised(server_env, tmp_path) as server:
            await server.serving_workers(2)
            pids = [line["pid"] for line in server.events("worker started")]
            assert len(pids) == 2
            assert server.process is not None
            server.process.kill()
            await server.process.wait()
            codes: dict[int, int | None] = {}

            async def gone() -> bool:
                for pid in set(pids) - set(codes):
                    if not adopted:
                        # Not this process's child: only whether it is gone.
                        if not _pid_alive(pid):
                            codes[pid] = None
                        continue
                    # WNOHANG: answers at once, never blocks the loop.
                    reaped, status = os.waitpid(pid, os.WNOHANG)  # noqa: ASYNC222
                    if reaped:
                        codes[pid] = os.waitstatus_to_exitcode(status)
                return len(codes) == len(pids)

            await until(gone, "both workers exited")
            log = server.log_path.read_text()
            if adopted:
                assert list(codes.values()) == [0, 0], log
            assert sorted(
                line["worker"] for line in server.events("the supervisor is gone; draining")
            ) == [0, 1], log
            assert sorted(line["worker"] for line in server.events("stopped")) == [0, 1], log


# Run in a process of its own: logging's configuration is process-wide.
_ONE_WRITE_PER_LINE = """
import json, sys
writes = []
class Recording:
    def write(self, text):
        writes.append(text)
        return len(text)
    def flush(self):
        pass
sys.stderr = Recording()
from tether.server import logs
logs.configure("INFO", "json", worker=1)
logs.get("test").info("worker started", pid=1)
logs.get("test").warning("the supervisor is gone; draining")
print(json.dumps(writes))
"""


def test_each_log_line_reaches_stderr_in_one_write() -> None:
    # Workers share the supervisor's stderr; written unbuffered (as under
    # PYTHONUNBUFFERED), a line in two writes (text, then newline) let two
    # workers' lines run together, and neither parsed as JSON.
    done = subprocess.run(
        [sys.executable, "-c", _ONE_WRITE_PER_LINE],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    writes = json.loads(done.stdout)
    assert len(writes) == 2
    assert all(w.endswith("\n") and w.count("\n") == 1 for w in writes)
    assert [json.loads(w)["event"] for w in writes] == [
        "worker started",
        "the supervisor is gone; draining",
    ]
