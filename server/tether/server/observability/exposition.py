"""The metrics endpoint: GET /metrics on TETHER_METRICS_LISTEN, apart from gRPC.

With several workers (`serve --workers N`) the supervisor gives every
worker the same fresh PROMETHEUS_MULTIPROC_DIR and its TETHER_WORKER_INDEX;
each worker writes its values there, and worker 0 alone serves them,
summed by prometheus_client's MultiProcessCollector, with the SQL gauges
(state.py) beside them.
"""

from __future__ import annotations

import os

from aiohttp import web
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    generate_latest,
    values,
)
from prometheus_client.multiprocess import MultiProcessCollector

from tether.server import logs
from tether.server.observability import fast
from tether.server.observability.state import StateCollector

log = logs.get(__name__)

MULTIPROCESS_DIR = "PROMETHEUS_MULTIPROC_DIR"
WORKER_INDEX = "TETHER_WORKER_INDEX"


def serves_metrics() -> bool:
    """Whether this process serves the endpoint: a lone server, or worker 0."""
    return os.environ.get(WORKER_INDEX, "").strip() in ("", "0")


def check_multiprocess() -> None:
    """prometheus_client picks where values live when it is first imported:
    a PROMETHEUS_MULTIPROC_DIR set later would leave each worker counting
    in its own memory, and worker 0 serving only its own share."""
    if os.environ.get(MULTIPROCESS_DIR) and values.ValueClass.__name__ != "MmapedValue":
        raise SystemExit(
            f"{MULTIPROCESS_DIR} was set after prometheus_client was imported: "
            "set it in the environment before the server process starts"
        )


def _process_registry() -> CollectorRegistry:
    directory = os.environ.get(MULTIPROCESS_DIR)
    if not directory:
        return REGISTRY
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=directory)  # type: ignore[no-untyped-call]
    return registry


class MetricsServer:
    def __init__(self, listen: str, state: StateCollector | None) -> None:
        self._listen = listen
        self.state = state
        self._registry = _process_registry()
        self._state_registry = CollectorRegistry()
        if state is not None:
            self._state_registry.register(state)
        self._runner: web.AppRunner | None = None
        self.port = 0

    async def _metrics(self, _request: web.Request) -> web.Response:
        if self.state is not None:
            await self.state.refresh()
        fast.flush()
        body = generate_latest(self._registry) + generate_latest(self._state_registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def start(self) -> None:
        host, _, port = self._listen.rpartition(":")
        if not port.isdigit():
            raise SystemExit(
                f"TETHER_METRICS_LISTEN={self._listen!r} is not host:port (e.g. 0.0.0.0:9464)"
            )
        app = web.Application()
        app.router.add_get("/metrics", self._metrics)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, host.strip("[]") or None, int(port))
        try:
            await site.start()
        except OSError as exc:
            await runner.cleanup()
            raise SystemExit(
                f"cannot listen on {self._listen} for metrics: {exc.strerror or exc}; "
                "set TETHER_METRICS_LISTEN"
            ) from exc
        self._runner = runner
        # The port bound (port 0 picks a free one).
        self.port = int(runner.addresses[0][1])
        log.info("metrics listening", address=f"{host}:{self.port}")

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
