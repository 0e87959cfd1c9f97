"""Assembles the server: storage, Redis, each area's store (picked here,
once, for the database in the settings), the areas and the hooks between
them, health, reflection, and a graceful stop."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import importlib
import signal
import socket
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection
from sqlalchemy import func, select
from sqlalchemy.exc import SQLAlchemyError

from tether.server import logs, port_lock
from tether.server.admin import area as admin_area
from tether.server.admin.area import AdminArea
from tether.server.binding import area as binding_area
from tether.server.binding import bindings
from tether.server.binding.area import BindingArea
from tether.server.binding.store_postgres import PostgresBindingStore
from tether.server.binding.store_sqlalchemy import SqlAlchemyBindingStore
from tether.server.components import Component
from tether.server.counters.connection import Client
from tether.server.counters.connection import connect as connect_redis
from tether.server.guard import area as guard_area
from tether.server.guard import identities
from tether.server.guard.area import GuardArea
from tether.server.guard.store_postgres import PostgresGuardStore
from tether.server.guard.store_sqlalchemy import SqlAlchemyGuardStore
from tether.server.observability import exposition, fast, probes
from tether.server.observability import setup as observability_setup
from tether.server.observability.setup import Observability
from tether.server.observability.state import Snapshot, StateCollector
from tether.server.port_lock import PortLock, PortTaken
from tether.server.provisioning import area as provisioning_area
from tether.server.provisioning import instructions
from tether.server.provisioning.area import ProvisioningArea
from tether.server.provisioning.store_postgres import PostgresProvisioningStore
from tether.server.provisioning.store_sqlalchemy import SqlAlchemyProvisioningStore
from tether.server.provisioning.tables import LEASED, PENDING
from tether.server.runtime import Runtime
from tether.server.settings import Settings
from tether.server.shared import digests
from tether.server.storage import database, migrate
from tether.server.storage.database import Database
from tether.server.transport import credentials, tls
from tether.server.transport.credentials import Credential
from tether.server.transport.registration import GenericHandlersOnly

log = logs.get(__name__)


@dataclass(frozen=True)
class Areas:
    admin: AdminArea
    binding: BindingArea
    provisioning: ProvisioningArea
    guard: GuardArea

    def components(self) -> list[Component]:
        """In start order; they stop in the reverse."""
        return [self.admin, self.binding, self.provisioning, self.guard]


@dataclass
class App:
    settings: Settings
    runtime: Runtime
    server: grpc.aio.Server
    port: int
    health: health_aio.HealthServicer
    areas: Areas
    observability: Observability = field(default_factory=Observability)
    # The Prometheus endpoint, when this process serves one.
    metrics: exposition.MetricsServer | None = None
    # Moves the hot paths' counts into the series (observability/fast.py).
    flushing: asyncio.Task[None] | None = None

    @property
    def components(self) -> list[Component]:
        return self.areas.components()

    @property
    def address(self) -> str:
        host = self.settings.listen.rsplit(":", 1)[0]
        return f"{host}:{self.port}"

    async def start(self) -> None:
        await self.server.start()
        if self.observability.metrics:
            self.flushing = asyncio.create_task(fast.keep_flushing(), name="metrics-flush")
        if self.metrics is not None:
            await self.metrics.start()
        started = []
        try:
            for component in self.components:
                if component.start is not None:
                    # Its stop undoes a start that failed half way, too.
                    started.append(component)
                    await component.start()
        except BaseException:
            # A component that cannot start (the web side's port taken, say):
            # those that did stop, so their tasks do not outlive the failure.
            for component in reversed(started):
                if component.stop is not None:
                    with contextlib.suppress(Exception):
                        await component.stop()
            raise
        for component in self.components:
            for name in component.services:
                await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        await self.health.set("", health_pb2.HealthCheckResponse.SERVING)
        log.info(
            "listening",
            address=self.address,
            embedded=self.settings.embedded,
            tls=tls.mode(self.settings),
            guard_core="compiled" if identities.compiled() else "python",
        )

    async def stop(self, grace: float | None = None) -> None:
        """Stops taking calls, lets in-flight calls finish within the grace period."""
        await self.health.enter_graceful_shutdown()
        for component in reversed(self.components):
            if component.stop is not None:
                await component.stop()
        await self.server.stop(self.settings.shutdown_grace_seconds if grace is None else grace)
        if self.metrics is not None:
            await self.metrics.stop()
        if self.flushing is not None:
            self.flushing.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.flushing
        self.observability.shutdown()
        await self.runtime.redis.aclose()
        await self.runtime.db.close()
        log.info("stopped")


def _connect_redis(settings: Settings) -> Client:
    try:
        return connect_redis(
            settings.redis_url, settings.redis_timeout_seconds, cluster=settings.redis_cluster
        )
    except ValueError as exc:
        raise SystemExit(f"TETHER_REDIS_URL: {exc}") from exc


def _load_digest_keys(settings: Settings) -> list[digests.DigestKey]:
    if settings.digest_keys:
        return digests.parse_keys(settings.digest_keys)
    if settings.embedded_database:
        return digests.load_or_create_embedded(settings.data_dir / "digest-keys")
    raise SystemExit("TETHER_DIGEST_KEYS is required with an external database")


async def _bootstrap_embedded_admin(settings: Settings, db: Database) -> None:
    """A newcomer's first admin token: written once into data_dir."""
    token_file = settings.data_dir / "admin.token"
    async with db.sessions() as session:
        admins = await session.scalar(
            select(func.count()).select_from(Credential).where(Credential.kind == "admin")
        )
    if admins:
        return
    token = await credentials.create_admin(db, "embedded quick start")
    token_file.write_text(token + "\n")
    token_file.chmod(0o600)
    log.warning("created an admin credential for the quick start", token_file=str(token_file))


async def _check_schema(db: Database) -> None:
    """Refuses to serve on a database this version cannot use, and says why."""
    try:
        current = await migrate.current_revision(db.engine)
    except (OSError, SQLAlchemyError) as exc:
        raise SystemExit(f"cannot reach the database: {exc}") from exc
    head = migrate.head_revision()
    if current != head:
        raise SystemExit(
            f"the database schema is at revision {current}, this server needs {head}: "
            "run `tether-server migrate` (or set TETHER_MIGRATE_ON_START=true)"
        )


def _load_service_descriptors(names: list[str]) -> None:
    """Imports each service's service_pb2 module, so reflection can describe it.

    The generated *_pb2_grpc modules import only the messages; without this
    the service descriptors never reach the default pool, and tools like
    `buf curl` list the services but cannot call them.
    """
    for name in names:
        package = name.rsplit(".", 1)[0]
        importlib.import_module(f"{package}.service_pb2")


def _build_areas(services: grpc.aio.Server, runtime: Runtime) -> Areas:
    """Every area on the stores of the configured database, and the hooks
    between areas: provisioning reads bindings and hangs its outbox on
    binding's change hook."""
    db = runtime.db
    postgres = not database.is_sqlite(db.url)
    binding = binding_area.build(
        services,
        runtime,
        PostgresBindingStore(db) if postgres else SqlAlchemyBindingStore(db),
    )
    provisioning = provisioning_area.build(
        services,
        runtime,
        PostgresProvisioningStore(db) if postgres else SqlAlchemyProvisioningStore(db),
        bindings=binding.bindings,
    )
    binding.changes.listen(provisioning.outbox)
    guard = guard_area.build(
        services, runtime, PostgresGuardStore(db) if postgres else SqlAlchemyGuardStore(db)
    )
    return Areas(admin_area.build(services, runtime), binding, provisioning, guard)


def _cannot_listen(address: str, why: str) -> SystemExit:
    return SystemExit(f"cannot listen on {address} for gRPC: {why}; set TETHER_LISTEN")


def _check_listen_address(address: str) -> None:
    """Binds the address once, without SO_REUSEPORT, before anything is made:
    a port in use is refused with one line instead of gRPC's log and a
    half-built server."""
    host, _, port = address.rpartition(":")
    try:
        resolved = socket.getaddrinfo(
            host.strip("[]") or None, int(port), type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
        for family, kind, proto, _name, sockaddr in resolved:
            with socket.socket(family, kind, proto) as probe:
                # As gRPC binds: a port our own last run left in TIME-WAIT is free.
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                probe.bind(sockaddr)
    except (OSError, ValueError) as exc:
        raise _cannot_listen(address, getattr(exc, "strerror", None) or str(exc)) from exc


def _listen(
    server: grpc.aio.Server, address: str, credentials: grpc.ServerCredentials | None
) -> int:
    """The port bound, or one line saying which setting to change."""
    try:
        if credentials is None:
            port = server.add_insecure_port(address)
        else:
            port = server.add_secure_port(address, credentials)
    except RuntimeError:  # grpcio >= 1.60 raises where it used to return 0
        port = 0
    if port == 0:
        raise _cannot_listen(address, "the address is in use or not available")
    return port


def _sql_state(db: Database) -> StateCollector:
    """The metrics' gauges of SQL state, read when scraped."""

    async def read() -> Snapshot:
        snapshot = Snapshot()
        async with db.sessions() as session:
            snapshot.bindings_active = await bindings.active_by_partner(session)
            for stage in await instructions.stages(session):
                snapshot.instructions[(stage.partner_id, stage.state)] = stage.count
                if stage.state in (PENDING, LEASED):
                    age = stage.oldest_age.total_seconds()
                    known = snapshot.oldest_undelivered_seconds.get(stage.partner_id, 0.0)
                    snapshot.oldest_undelivered_seconds[stage.partner_id] = max(known, age)
        return snapshot

    return StateCollector(read)


async def prepare(settings: Settings) -> None:
    """What runs once before any process serves: embedded mode's files,
    migrations, the embedded digest keys and the quick start's admin token.
    With several workers the supervisor runs it, never each worker."""
    if settings.embedded:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        log.warning(
            "EMBEDDED MODE: not for production",
            database="SQLite in " + str(settings.data_dir)
            if settings.embedded_database
            else "external",
            redis="in-process fakeredis" if settings.embedded_redis else "external",
        )
    if settings.embedded_database or settings.migrate_on_start:
        await migrate.upgrade_async(settings.effective_database_url)
    _load_digest_keys(settings)
    db = Database(settings.effective_database_url, 1)
    try:
        await _check_schema(db)
        if settings.embedded_database:
            await _bootstrap_embedded_admin(settings, db)
    finally:
        await db.close()


async def build(
    settings: Settings,
    *,
    worker: bool = False,
    interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
    tracer_provider: Any = None,
) -> App:
    """The server, ready to start. A worker of a supervisor (worker=True)
    skips the port probe and prepare(), which the supervisor ran, and shares
    the port with its siblings (SO_REUSEPORT). interceptors: the embedding
    code's own (stock instrumentation, say); they see every call before
    Tether's handler, which authenticates it and, when on, times and traces
    it; each one installed costs every call (see transport/interceptor.py).
    tracer_provider: an OpenTelemetry provider to trace with instead of one
    exporting over OTLP."""
    exposition.check_multiprocess()
    observability = observability_setup.configure(settings, tracer_provider)
    tls_files = tls.TlsFiles.from_settings(settings)
    tls.check_plaintext_allowed(settings, tls_files)
    # Read now: a missing or mismatched file stops the start before anything is made.
    server_credentials = None if tls_files is None else tls.server_credentials(tls_files)
    if not worker:
        _check_listen_address(settings.listen)
        await prepare(settings)

    # First: a Redis URL it cannot use stops the start before anything opens.
    redis_client = _connect_redis(settings)
    db = Database(settings.effective_database_url, settings.database_pool_size)
    query_logger = probes.query_logger()
    if query_logger is not None:
        db.observe_queries(query_logger)
    connection_observer = probes.connection_observer()
    if connection_observer is not None:
        db.observe_connections(connection_observer)
    await _check_schema(db)
    runtime = Runtime(
        settings=settings,
        db=db,
        redis=redis_client,
        digester=digests.Digester(_load_digest_keys(settings)),
        credentials=credentials.CredentialVerifier(db, settings.credential_cache_seconds),
    )
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", settings.max_message_bytes),
            ("grpc.max_send_message_length", settings.max_message_bytes),
            # gRPC sets SO_REUSEPORT by default: a second server on the same
            # port would bind silently and take a share of the calls. Only a
            # supervisor's workers share theirs (the supervisor's port lock
            # keeps every other server off it).
            ("grpc.so_reuseport", 1 if worker else 0),
        ],
        # None rather than empty: no interceptor chain runs at all.
        interceptors=list(interceptors) or None,
    )
    # Every call is authenticated (and observed, when metrics or tracing
    # are on) by the handler GenericHandlersOnly puts in front.
    services = GenericHandlersOnly(server, runtime.credentials, observability.layers())
    areas = _build_areas(services, runtime)

    names = [name for c in areas.components() for name in c.services]
    _load_service_descriptors(names)
    health = health_aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, services)
    reflection.enable_server_reflection(
        [
            *names,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        ],
        services,
    )
    port = _listen(server, settings.listen, server_credentials)
    metrics = None
    if settings.metrics_listen and exposition.serves_metrics():
        metrics = exposition.MetricsServer(settings.metrics_listen, _sql_state(db))
    return App(settings, runtime, server, port, health, areas, observability, metrics)


def claim_port(address: str) -> PortLock | None:
    """The gRPC port's lock (port_lock), then the port probed under it; one
    line when either is taken. Port 0 needs none: nobody else gets that port."""
    port = int(address.rpartition(":")[2] or 0)
    if port == 0:
        return None
    try:
        lock = port_lock.claim(port)
    except (PortTaken, OSError) as exc:
        raise _cannot_listen(address, str(exc)) from None
    try:
        _check_listen_address(address)
    except BaseException:
        lock.close()
        raise
    return lock


async def serve(settings: Settings) -> None:
    """One process serving until SIGTERM or SIGINT."""
    lock = claim_port(settings.listen)
    try:
        await _serve(await build(settings))
    finally:
        if lock is not None:
            lock.close()


async def serve_worker(settings: Settings, control: socket.socket) -> None:
    """One of a supervisor's workers (workers.py): says "ready" on the
    control socket once it serves, and drains on SIGTERM or SIGINT, or when
    the supervisor is gone (the socket's end of file)."""
    app = await build(settings, worker=True)
    reader, writer = await asyncio.open_connection(sock=control)
    stopping = asyncio.Event()

    def drain_for_the_gone_supervisor() -> None:
        if not stopping.is_set():
            log.warning("the supervisor is gone; draining")
            stopping.set()

    async def supervisor_gone() -> None:
        with contextlib.suppress(ConnectionError):
            await reader.read()
        drain_for_the_gone_supervisor()

    watch: list[asyncio.Task[None]] = []

    async def ready() -> None:
        try:
            writer.write(b"ready\n")
            await writer.drain()
        except ConnectionError:
            # It died before this worker had started: drain all the same.
            drain_for_the_gone_supervisor()
            return
        watch.append(asyncio.create_task(supervisor_gone(), name="supervisor-watch"))

    try:
        await _serve(app, stopping, ready)
    finally:
        for task in watch:
            task.cancel()
        writer.close()


# Objects allocated between two young collections (Python's default: 700).
# Each call in flight holds its request, task and messages; at 700, with 32
# calls in flight, many survived into the older generations and made full
# collections, which walk the guard's identity book, come every few thousand
# first visits: ~100 us of each new browser's Evaluate, 40 us at 10,000.
GC_YOUNG_THRESHOLD = 10_000


def settle_collector() -> None:
    """What a serving process does to the collector once started."""
    # What startup made (modules, SQL metadata, compiled statements) lives
    # as long as the process: out of the collector's sight, a full
    # collection no longer walks it, which otherwise paused every request
    # for 100+ ms at a time.
    gc.freeze()
    gc.set_threshold(GC_YOUNG_THRESHOLD, *gc.get_threshold()[1:])


async def _serve(
    app: App,
    stopping: asyncio.Event | None = None,
    ready: Callable[[], Awaitable[None]] | None = None,
) -> None:
    try:
        await app.start()
    except BaseException:
        # Half started (a port taken, say): the gRPC server must stop while
        # the loop runs, or its finalizer prints a traceback after the error.
        await app.server.stop(0)
        raise
    settle_collector()
    stopping = stopping or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    if ready is not None:
        await ready()
    await stopping.wait()
    log.info("draining", grace_seconds=app.settings.shutdown_grace_seconds)
    await app.stop()
