"""`tether-server serve --workers N`: a supervisor and N worker processes
sharing the gRPC port.

The supervisor claims the port (port_lock: no other server may join it),
runs the one-time work (app.prepare: migrations, embedded files) once,
then starts each worker as a fresh interpreter (`python -m tether.server
worker`; never a fork of a running event loop). Workers bind the port with
SO_REUSEPORT, so the kernel spreads new connections among them.

- Each worker gets TETHER_WORKER_INDEX (0..N-1) and, with N > 1, a shared
  PROMETHEUS_MULTIPROC_DIR made for this run and removed at exit.
- Only worker 0 serves the guard's web side (TETHER_HTTP_LISTEN): it is a
  light page server, and one binder keeps its port's clash check as it is.
- Each worker holds one end of a socket pair: it says "ready" on it once it
  serves, and sees the supervisor's death as its end of file (then drains).
- SIGTERM or SIGINT is forwarded to every worker, which drains; the
  supervisor exits 0 once they all have.
- A worker that dies after it served is restarted, after a delay that grows
  while it keeps dying. A worker that cannot start at all (at the first
  start, or MAX_FAILED_STARTS times in a row later) stops the whole server
  with a non-zero exit: bad settings are not retried forever.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from dataclasses import dataclass, field

from tether.server import app, logs
from tether.server.settings import Settings

log = logs.get(__name__)

FIRST_RESTART_DELAY = 0.5
MAX_RESTART_DELAY = 30.0
# A worker that served this long before dying restarts at the first delay.
STABLE_SECONDS = 60.0
# Consecutive starts of one worker that never reach "ready" before giving up.
MAX_FAILED_STARTS = 5
# Beyond the drain's grace, how long the supervisor waits before SIGKILL.
KILL_MARGIN_SECONDS = 10.0


class WorkersFailed(Exception):
    """Workers could not start: the message says which and why."""


def check(settings: Settings, workers: int) -> None:
    """Refuses worker counts the settings cannot serve, in one line."""
    if workers < 1:
        raise SystemExit(f"TETHER_WORKERS must be 1 or more, not {workers}")
    if workers > 1 and settings.embedded:
        raise SystemExit(
            f"{workers} workers need TETHER_DATABASE_URL (PostgreSQL) and TETHER_REDIS_URL: "
            "embedded SQLite and the in-process fakeredis belong to one process; "
            "set TETHER_WORKERS=1 or both URLs"
        )


def _resolved(address: str) -> str:
    """The address with port 0 replaced by a free port, so every worker binds the same."""
    host, _, port = address.rpartition(":")
    if int(port or 0) != 0:
        return address
    resolved = socket.getaddrinfo(
        host.strip("[]") or None, 0, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    with socket.socket(resolved[0], resolved[1], resolved[2]) as probe:
        probe.bind(resolved[4])
        return f"{host}:{probe.getsockname()[1]}"


@dataclass
class _Worker:
    index: int
    process: asyncio.subprocess.Process | None = None
    control: asyncio.StreamWriter | None = None
    served: asyncio.Event = field(default_factory=asyncio.Event)


class Supervisor:
    def __init__(self, settings: Settings, count: int) -> None:
        self._settings = settings
        self._count = count
        self._stopping = asyncio.Event()
        self._workers = [_Worker(i) for i in range(count)]
        self._lock_fd = -1
        self._metrics_dir = ""

    async def run(self) -> None:
        """Serves until SIGTERM or SIGINT; raises WorkersFailed when workers
        cannot start, SystemExit when the settings or the port are refused."""
        address = _resolved(self._settings.listen)
        lock = app.claim_port(address)
        assert lock is not None
        self._settings = self._settings.model_copy(update={"listen": address})
        try:
            await app.prepare(self._settings)
            self._lock_fd = lock.fileno()
            if self._count > 1:
                self._metrics_dir = tempfile.mkdtemp(prefix="tether-metrics-")
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, self._stop)
            log.info("starting workers", workers=self._count, address=address)
            await self._supervise()
        finally:
            if self._metrics_dir:
                shutil.rmtree(self._metrics_dir, ignore_errors=True)
            lock.close()

    def _stop(self) -> None:
        if self._stopping.is_set():
            return
        log.info("stopping workers", grace_seconds=self._settings.shutdown_grace_seconds)
        self._stopping.set()
        for worker in self._workers:
            if worker.process is not None and worker.process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    worker.process.send_signal(signal.SIGTERM)

    async def _supervise(self) -> None:
        tasks = [
            asyncio.create_task(self._keep(w), name=f"worker-{w.index}") for w in self._workers
        ]
        try:
            # The first failure (a worker that cannot start) ends them all.
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
            for task in done:
                if task.exception() is not None:
                    raise task.exception()  # type: ignore[misc]
        finally:
            self._stop()
            await self._wait_for_all(tasks)

    async def _wait_for_all(self, tasks: list[asyncio.Task[None]]) -> None:
        bound = self._settings.shutdown_grace_seconds + KILL_MARGIN_SECONDS
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(bound):
                await asyncio.gather(*tasks, return_exceptions=True)
                return
        for worker in self._workers:
            if worker.process is not None and worker.process.returncode is None:
                log.warning("worker did not drain in time; killing it", worker=worker.index)
                with contextlib.suppress(ProcessLookupError):
                    worker.process.kill()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _keep(self, worker: _Worker) -> None:
        """Runs one worker until the supervisor stops, restarting it when it dies."""
        delay = FIRST_RESTART_DELAY
        failed_starts = 0
        while not self._stopping.is_set():
            started = time.monotonic()
            served, code = await self._run_once(worker)
            if self._stopping.is_set():
                if code != 0:
                    log.warning("worker exited while draining", worker=worker.index, code=code)
                return
            if served:
                failed_starts = 0
                if time.monotonic() - started >= STABLE_SECONDS:
                    delay = FIRST_RESTART_DELAY
            else:
                failed_starts += 1
                first_start = not worker.served.is_set()
                if first_start or failed_starts >= MAX_FAILED_STARTS:
                    attempts = "" if first_start else f" {failed_starts} times in a row"
                    raise WorkersFailed(
                        f"worker {worker.index} could not start{attempts} (exit code {code}); "
                        "its reason is above"
                    )
            log.warning(
                "worker died; restarting",
                worker=worker.index,
                code=code,
                restart_in_seconds=delay,
            )
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self._stopping.wait()
            delay = min(delay * 2, MAX_RESTART_DELAY)

    async def _run_once(self, worker: _Worker) -> tuple[bool, int]:
        """Starts the worker and waits for its exit: (whether it served, exit code)."""
        parent, child = socket.socketpair()
        try:
            worker.process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "tether.server",
                "worker",
                "--control-fd",
                str(child.fileno()),
                env=self._environment(worker.index),
                pass_fds=(child.fileno(), self._lock_fd),
            )
        finally:
            child.close()
        log.info("worker started", worker=worker.index, pid=worker.process.pid)
        reader, worker.control = await asyncio.open_connection(sock=parent)
        try:
            served = await reader.readline() == b"ready\n"
            if served:
                worker.served.set()
            code = await worker.process.wait()
            if self._metrics_dir:
                # Its live gauges (partner streams, say) leave the sum with it.
                from prometheus_client import multiprocess

                multiprocess.mark_process_dead(worker.process.pid, self._metrics_dir)  # type: ignore[no-untyped-call]
        finally:
            # Closing our end tells a worker still running that we are gone.
            worker.control.close()
        return served, code

    def _environment(self, index: int) -> dict[str, str]:
        """The worker's environment: the supervisor's settings exactly (they
        may have come from the command line), its index, and the shared
        metrics directory."""
        env = dict(os.environ)
        for name, value in self._settings.model_dump(mode="json").items():
            variable = f"TETHER_{name.upper()}"
            if value is None:
                env.pop(variable, None)
            else:
                # As pydantic-settings reads them: text as is, the rest as JSON.
                env[variable] = value if isinstance(value, str) else json.dumps(value)
        env["TETHER_WORKER_INDEX"] = str(index)
        if index > 0:
            env["TETHER_HTTP_LISTEN"] = ""
        if self._metrics_dir:
            env["PROMETHEUS_MULTIPROC_DIR"] = self._metrics_dir
        return env


async def supervise(settings: Settings, workers: int) -> None:
    check(settings, workers)
    try:
        await Supervisor(settings, workers).run()
    except WorkersFailed as exc:
        raise SystemExit(f"tether-server: {exc}") from None
