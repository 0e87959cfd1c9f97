"""Every Prometheus series the server keeps in process (docs/operations.md
says what each means).

The objects are made once, at import, in prometheus_client's default
registry; with PROMETHEUS_MULTIPROC_DIR set (several workers), their values
live in that directory's files instead and the serving worker sums them
(exposition.py). Counting is always on and costs a lock and an addition:
call sites hold labelled children made once (`labels()` looks the label
set up in a dict on every call). Whether anything is served is a setting
(TETHER_METRICS_LISTEN). Gauges of what SQL holds (bindings, instructions
by state, the oldest undelivered instruction) are not here: state.py reads
them when Prometheus scrapes.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram, disable_created_metrics

# The Go ecosystem's gRPC series carry no *_created samples; Tether's match.
disable_created_metrics()  # type: ignore[no-untyped-call]

# --- gRPC server (names and labels of go-grpc-prometheus) ----------------------
_RPC = ("grpc_type", "grpc_service", "grpc_method")

GRPC_STARTED = Counter("grpc_server_started", "RPCs started on the server.", _RPC)
GRPC_HANDLED = Counter(
    "grpc_server_handled",
    "RPCs completed on the server, by their final status code.",
    (*_RPC, "grpc_code"),
)
GRPC_HANDLING_SECONDS = Histogram(
    "grpc_server_handling_seconds",
    "Time from the start of an RPC to its final status, on the server.",
    _RPC,
)
GRPC_MSG_RECEIVED = Counter(
    "grpc_server_msg_received", "Request messages received on the server.", _RPC
)
GRPC_MSG_SENT = Counter("grpc_server_msg_sent", "Response messages sent by the server.", _RPC)

# --- binding -------------------------------------------------------------------
REPORTS = Counter(
    "tether_binding_reports",
    "ReportAccountUse outcomes, one per partner a report concerned.",
    ("outcome",),
)
IMPORT_ROWS = Counter("tether_binding_import_rows", "Eligible-list entries imported.")
IMPORT_REJECTED = Counter(
    "tether_binding_import_rejected", "Eligible-list entries refused as invalid by an import."
)

# --- provisioning ----------------------------------------------------------------
REDELIVERIES = Counter(
    "tether_provisioning_redeliveries",
    "Instructions leased again after an earlier delivery got no confirmation or a retry.",
)
DEAD_INSTRUCTIONS = Counter(
    "tether_provisioning_dead_instructions",
    "Instructions parked as dead after their last allowed delivery.",
)
PARTNER_STREAMS = Gauge(
    "tether_provisioning_partner_streams",
    "Partner Connect streams open, by partner.",
    ("partner_id",),
    # Each worker's own streams; a worker that exits takes its share with it.
    multiprocess_mode="livesum",
)

# --- guard -------------------------------------------------------------------------
GUARD_VERDICTS = Counter(
    "tether_guard_verdicts",
    "Evaluate verdicts, by action, verdict (allow, deny) and reason.",
    ("action", "verdict", "reason"),
)
GUARD_RECORD_BATCH = Histogram(
    "tether_guard_record_batch_size",
    "Changes merged into one write of the guard's SQL record.",
    buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500, 1000),
)
GUARD_RECORD_LAG = Histogram(
    "tether_guard_record_lag_seconds",
    "Age of a batch's oldest change when the guard's SQL record committed it.",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
GUARD_WEB_CONNECTIONS_REFUSED = Counter(
    "tether_guard_web_connections_refused",
    "Connections to the guard's web side closed as they opened, by which bound: "
    "the web side's limit (total) or the limit per client address (per_client).",
    ("bound",),
)
GUARD_WEB_BAD_REQUESTS = Counter(
    "tether_guard_web_bad_requests",
    "Malformed HTTP requests to the guard's web side (answered 400 by aiohttp, not logged), "
    "and clients that hung up mid-request.",
)
GUARD_WEB_CONNECTIONS_SILENT = Counter(
    "tether_guard_web_connections_silent",
    "Connections to the guard's web side closed after sending nothing for the idle bound.",
)

# --- backends ------------------------------------------------------------------------
FAIL_MODE = Counter(
    "tether_fail_mode",
    "Calls answered by a fail mode because Redis did not answer in time, "
    "by component and mode (open: let through, closed: refused UNAVAILABLE).",
    ("component", "mode"),
)
_BACKEND_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)
REDIS_SECONDS = Histogram(
    "tether_redis_call_seconds",
    "Redis call latency as the server saw it, by operation; failed calls included.",
    ("operation",),
    buckets=_BACKEND_BUCKETS,
)
POSTGRES_SECONDS = Histogram(
    "tether_postgres_connection_seconds",
    "How long each use of a PostgreSQL connection held it: its statements and "
    "the server's work between them (waiting for the connection excluded).",
    buckets=_BACKEND_BUCKETS,
)

# Children every process uses, made once.
BINDING_RATE_LIMIT_FAIL_OPEN = FAIL_MODE.labels("binding_rate_limit", "open")
GUARD_FAIL_OPEN = FAIL_MODE.labels("guard", "open")
GUARD_FAIL_CLOSED = FAIL_MODE.labels("guard", "closed")
