"""Every knob of the server, read from TETHER_* environment variables.

docs/configuration.md lists them in one table. Anything left unset runs on an
embedded default (SQLite, in-process Redis), which suits a laptop, not
production: the server logs loudly when it is in embedded mode.
"""

from __future__ import annotations

from functools import cached_property
from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="TETHER_", extra="ignore")

    # --- transport ---------------------------------------------------------
    listen: str = Field("127.0.0.1:50051", description="host:port of the gRPC server")
    shutdown_grace_seconds: float = Field(
        10.0, description="how long SIGTERM waits for in-flight calls before cancelling them"
    )
    max_message_bytes: int = Field(8 * 1024 * 1024, description="largest gRPC message accepted")
    tls_cert_file: str = Field(
        "",
        description="PEM certificate chain the gRPC port (and the guard's web side) serves "
        "TLS with; reread when the file changes; empty: plaintext",
    )
    tls_key_file: str = Field(
        "", description="PEM private key of tls_cert_file; reread when the file changes"
    )
    tls_client_ca_file: str = Field(
        "",
        description="PEM CA certificates that sign client certificates: set, every gRPC "
        "client must present one (mutual TLS; bearer credentials are still required)",
    )
    allow_plaintext: bool = Field(
        False,
        description="listen without TLS on an address other than loopback (behind a "
        "TLS-terminating proxy, say); off: the server refuses to start",
    )
    workers: int = Field(
        1,
        ge=1,
        description="server processes sharing the gRPC port (`serve --workers`); more than 1 "
        "needs PostgreSQL and an external Redis; about one per core",
    )

    # --- storage -----------------------------------------------------------
    data_dir: Path = Field(Path(".tether"), description="where embedded mode keeps its files")
    database_url: str = Field(
        "",
        description="SQLAlchemy URL, e.g. postgresql+asyncpg://user@host/db; "
        "empty: SQLite in data_dir (embedded)",
    )
    database_pool_size: int = Field(
        20, description="PostgreSQL connections per pool (engine, report fast path) per process"
    )
    migrate_on_start: bool = Field(
        False, description="apply migrations at start-up (always on in embedded mode)"
    )
    redis_url: str = Field(
        "",
        description="redis:// URL, or redis+cluster://host:port,host:port,... for a Redis "
        "Cluster; empty: an in-process fakeredis (embedded)",
    )
    redis_cluster: bool = Field(
        False,
        description="treat a redis:// URL as one node of a Redis Cluster (same as redis+cluster://)",
    )
    redis_timeout_seconds: float = Field(
        0.25, description="bound on each Redis call before its fail mode applies"
    )

    # --- security ----------------------------------------------------------
    digest_keys: str = Field(
        "",
        description="HMAC keys for account and device digests: 'id:base64,id:base64', "
        "the first is current; empty in embedded mode: generated into data_dir",
    )
    credential_cache_seconds: float = Field(
        5.0, description="how long a verified credential is trusted without a database read"
    )

    # --- binding -----------------------------------------------------------
    report_rate_per_minute: int = Field(
        60,
        description="ReportAccountUse calls per device and credential per minute; 0: no limit",
    )
    import_workers: int = Field(
        0,
        description="worker processes that normalize bulk imports beside the server "
        "(0: in the server process); about one per spare CPU core",
    )

    # --- logs --------------------------------------------------------------
    log_format: Literal["console", "json"] = Field("console", description="log line format")
    log_level: str = Field("INFO", description="lowest level logged")

    # --- observability (owned by tether.server.observability) -------------
    metrics_listen: str = Field(
        "",
        description="host:port of the Prometheus endpoint (GET /metrics), apart from gRPC; "
        "empty: not served (the default); with several workers, worker 0 serves them all",
    )
    tracing: bool = Field(
        False,
        description="export OpenTelemetry traces over OTLP (endpoint, sampler and resource "
        "from the standard OTEL_* variables; an OTLP endpoint set there turns it on too, "
        "OTEL_SDK_DISABLED=true off)",
    )

    # --- provisioning (owned by tether.server.provisioning) ----------------
    provisioning_ack_deadline_seconds: float = Field(
        30.0,
        description="how long a delivered instruction waits for its confirmation before "
        "it is delivered again; each further wait grows by provisioning_backoff_factor",
    )
    provisioning_backoff_factor: float = Field(
        2.0, description="growth of the wait between deliveries of one instruction"
    )
    provisioning_max_backoff_seconds: float = Field(
        600.0, description="longest wait between deliveries of one instruction"
    )
    provisioning_retry_delay_seconds: float = Field(
        5.0,
        description="first wait after a retryable failure; grows like the ack deadline",
    )
    provisioning_max_attempts: int = Field(
        10, description="deliveries of an instruction before it is parked as dead"
    )
    provisioning_max_in_flight: int = Field(
        100, description="unconfirmed instructions on one partner stream at most"
    )
    provisioning_poll_seconds: float = Field(
        5.0,
        description="safety-net poll of the instruction table; new instructions wake "
        "dispatchers at once (PostgreSQL LISTEN/NOTIFY, or in-process on SQLite)",
    )
    provisioning_usage_query_seconds: float = Field(
        5.0,
        description="how long a device usage query waits for the partner when the "
        "caller set no deadline",
    )

    # --- fingerprint guard (owned by tether.server.guard) ------------------
    http_listen: str = Field(
        "127.0.0.1:8080",
        description="host:port of the guard's web side (collector script, demo pages); "
        "port 0 picks a free port; empty turns the web side off",
    )
    guard_trusted_proxies: str = Field(
        "",
        description="comma-separated IPs/CIDRs of reverse proxies whose X-Forwarded-For "
        "the web side believes; empty: the connection's address is the client IP",
    )
    guard_web_max_connections: int = Field(
        1000,
        ge=1,
        description="connections the guard's web side holds at once, at most a quarter of "
        "the process's file descriptors (the rest stay for gRPC); 64 per client address "
        "(but a trusted proxy's)",
    )
    guard_web_idle_seconds: float = Field(
        30.0,
        gt=0,
        description="a web-side connection that sends nothing for this long is closed "
        "(idle between requests, or stalled in one)",
    )
    guard_demo_service: str = Field(
        "demo",
        description="guard service the web side's demo pages evaluate against; "
        "created with small limits when absent",
    )
    guard_bucket_bits: int = Field(
        16,
        ge=0,
        le=24,
        description="fingerprints share Redis keys in 2^bits buckets per service and action; "
        "pick about log2(expected fingerprints / 16); changing it needs a counter rebuild",
    )
    guard_policy_cache_seconds: float = Field(
        2.0, description="how long a server trusts a guard policy before rereading SQL"
    )
    guard_forget_after_days: float = Field(
        30.0,
        ge=8.0,
        le=3650.0,
        description="the guard's identity book forgets a fingerprint not seen for this "
        "long (its identity stays); memory follows the browsers of this span. At least 8: "
        "longer than the 7 days its rates and crowds look back on",
    )
    guard_strict_profile_links: bool = Field(
        False,
        description="judge a profile link also by each value's share among its device's own "
        "fingerprints: fewer strangers joined to a farm's identity where farms are common, "
        "and fewer of a farm's variants joined too",
    )

    @cached_property
    def embedded_database(self) -> bool:
        return not self.database_url

    @cached_property
    def embedded_redis(self) -> bool:
        return not self.redis_url

    @property
    def embedded(self) -> bool:
        return self.embedded_database or self.embedded_redis

    @property
    def effective_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite+aiosqlite:///{(self.data_dir / 'tether.db').resolve()}"
